"""The local Ray cluster kernelscale starts is private: loopback only, no dashboard, no client server."""

import os

import psutil
import pytest


def _ray_process_tree() -> list[psutil.Process]:
    me = psutil.Process(os.getpid())
    return [me, *me.children(recursive=True)]


def test_local_cluster_listens_on_loopback_only(ray_local):
    import ray

    if not ray_local.get("started_local"):
        pytest.skip("RAY_ADDRESS points at an external cluster; this test is about the local one")

    @ray.remote
    def ping() -> int:
        return 1

    assert ray.get([ping.remote() for _ in range(4)]) == [1] * 4
    pids = {p.pid for p in _ray_process_tree()}
    assert len(pids) > 2, "expected Ray's processes (gcs, raylet, workers) under the driver"
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "Ray's servers should be listening"
    public = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in listening
              if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not public, f"non-loopback listening sockets: {public}"
    names = {p.name() for p in _ray_process_tree()}
    assert not any("dashboard" in n.lower() and "agent" not in n.lower() for n in names), names
    assert not any("client_server" in " ".join(p.cmdline()) for p in _ray_process_tree() if p.is_running())


def test_gcs_address_is_loopback(ray_local):
    if not ray_local.get("started_local"):
        pytest.skip("external cluster")
    assert ray_local["address"].startswith("127.0.0.1:")


def test_xla_flags_added_once_and_never_override_the_user():
    from kernelscale.runtime import xla_flags

    assert xla_flags(None, "0.5.3") == "--xla_cpu_use_thunk_runtime=false"
    assert xla_flags("--xla_cpu_use_thunk_runtime=true --foo=1", "0.5.3") == "--xla_cpu_use_thunk_runtime=true --foo=1"
    once = xla_flags(None, "0.5.3")
    assert xla_flags(once, "0.5.3") == once
    assert xla_flags("--foo=1", "0.6.0") == "--foo=1"  # newer jaxlib: the flag may not exist, add nothing


@pytest.mark.parametrize("env, expected", [
    ({}, "--xla_cpu_use_thunk_runtime=false"),
    ({"KERNELSCALE_XLA_DEFAULTS": "0"}, ""),
    ({"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true"}, "--xla_cpu_use_thunk_runtime=true"),
])
def test_import_sets_xla_flags_before_jax_starts(env, expected):
    import subprocess
    import sys

    code = "import os, kernelscale; print(os.environ.get('XLA_FLAGS', ''))"
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KERNELSCALE_XLA_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_scoped_environ_restores_set_and_unset_variables_even_on_error(monkeypatch):
    from kernelscale.runtime import _scoped_environ

    monkeypatch.setenv("KS_TEST_SET", "before")
    monkeypatch.delenv("KS_TEST_UNSET", raising=False)
    with pytest.raises(RuntimeError):
        with _scoped_environ({"KS_TEST_SET": "inside", "KS_TEST_UNSET": "inside"}):
            assert os.environ["KS_TEST_SET"] == os.environ["KS_TEST_UNSET"] == "inside"
            raise RuntimeError("boom")
    assert os.environ["KS_TEST_SET"] == "before" and "KS_TEST_UNSET" not in os.environ
