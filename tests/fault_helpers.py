"""Helpers of the fault and bad-input suite (issue 9): CLI subprocesses, SIGKILL, chunk listings, tmpfs mounts.

A subprocess driver starts its own local Ray cluster, exactly as a user's ``kernelscale gram`` does. It runs
in a session of its own, so after SIGKILLing the driver the test also ends the Ray services it started
(they would outlive it, orphaned), by their ids.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from test_gram_engine import _chunk_bytes as _all_chunk_bytes  # noqa: F401 - reused helpers
from test_gram_engine import _npz_store as npz_store  # noqa: F401

KERNELSCALE = [sys.executable, "-m", "kernelscale.cli"]


def cli_env(ray_address: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # never join the test session's cluster by accident
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


def start_cli(*argv: str, ray_address: str | None = None, log_path: Path | None = None) -> subprocess.Popen:
    """``kernelscale ARGV`` as a child process (stdout/stderr to ``log_path`` or pipes)."""
    out: Any = open(log_path, "w") if log_path else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen([*KERNELSCALE, *argv], stdout=out, stderr=subprocess.STDOUT if log_path else subprocess.PIPE,
                            env=cli_env(ray_address), text=True, start_new_session=True)


def run_cli_process(*argv: str, ray_address: str | None = None, timeout: float = 180) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``kernelscale ARGV`` run to completion in a child process."""
    proc = subprocess.run([*KERNELSCALE, *argv], capture_output=True, text=True, env=cli_env(ray_address),
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def sigkill(proc: subprocess.Popen) -> None:
    """SIGKILL a child started by :func:`start_cli` and reap it (its Ray services are left running)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def kill_session_leftovers(proc: subprocess.Popen) -> int:
    """SIGKILL every process still in the session of a (dead) :func:`start_cli` child: the Ray services and
    actors its driver started. Returns how many were killed."""
    killed = 0
    for pid in session_pids(proc):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            continue
    return killed


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tile_files(path: str) -> dict[str, bytes]:
    """Bytes of every stored tile chunk of a Gram store, keyed 'i/j' (temporary ``*.partial`` files excluded)."""
    return {k: v for k, v in _all_chunk_bytes(path).items() if "partial" not in k}


def partial_files(path: str) -> list[str]:
    root = Path(path) / "gram" / "c"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.partial")) if root.is_dir() else []


def count_tiles(path: str) -> int:
    root = Path(path) / "gram" / "c"
    if not root.is_dir():
        return 0
    return sum(1 for p in root.rglob("*") if p.is_file() and p.name.isdigit())


def gram_worker_pids() -> list[int]:
    """PIDs of this test process's Gram engine actors (process title ``ray::GramWorker...``): descendants of
    this process only, so a concurrent test run on the same machine is never touched."""
    import psutil

    for _ in range(5):  # the walk fails when a process exits during it (actors come and go): retry
        try:
            children = psutil.Process().children(recursive=True)
            break
        except psutil.Error:
            continue
    else:
        return []
    pids = []
    for proc in children:
        try:
            if " ".join(proc.cmdline()).startswith("ray::GramWorker"):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def session_pids(proc: subprocess.Popen) -> list[int]:
    """Live processes in the session of a :func:`start_cli` child."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.info["pid"]) == proc.pid:
                out.append(p.info["pid"])
        except (ProcessLookupError, PermissionError):
            continue
    return out


def flip_byte(path: str | Path, where: float = 0.5) -> None:
    """XOR one byte of a file (at fraction ``where`` of its length) with 0xFF."""
    raw = bytearray(Path(path).read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    Path(path).write_bytes(bytes(raw))


def synthetic_images(n: int, shape: tuple[int, ...] = (4, 4, 1), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


class Tmpfs:
    """A small tmpfs mounted at ``path`` (root only); ``resize`` remounts it with another size."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        self.error = None if proc.returncode == 0 else (proc.stderr.strip() or f"mount exited {proc.returncode}")

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def unmount(self) -> None:
        if self.error is None:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)

    @classmethod
    def mounted(cls, path: Path, size: str):
        """A generator for a fixture: the mounted tmpfs, unmounted afterwards; skips the test where this process
        may not mount (not root and no CAP_SYS_ADMIN)."""
        import pytest

        fs = cls(path, size)
        if fs.error is not None:
            pytest.skip(f"cannot mount a tmpfs for the disk-full test ({fs.error}); needs root or CAP_SYS_ADMIN")
        try:
            yield fs
        finally:
            fs.unmount()
