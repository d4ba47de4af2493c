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
