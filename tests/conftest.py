"""Shared fixtures: small real datasets (mnist5k subsets), a local Ray cluster, CIFAR-10 location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kernelscale.loopback_cluster import free_port

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray starts its worker processes at nice 15; beside the other xdist workers' tests (nice 0) a test's own actors
# would wait behind them. Actors run at the test process's priority.
os.environ.setdefault("RAY_worker_niceness", "0")

CIFAR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "train"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (``make test``): one worker more than the CPUs, at most 6. Many tests wait on Ray start-up,
    subprocesses and disk, so a third worker on a 2-CPU machine keeps both CPUs busy."""
    return max(2, min(6, (os.cpu_count() or 1) + 1))


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not CIFAR_DIR.is_dir():
        pytest.skip(f"CIFAR-10 ImageFolder not found at {CIFAR_DIR} (present in CI and the dev machine, not in a user's clone)")
    return CIFAR_DIR


@pytest.fixture(scope="session")
def mnist_small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """mnist5k, 300 rows resized to 8x8, standardized, with a 100-row stratified validation split."""
    from kernelscale.data import ingest

    root = tmp_path_factory.mktemp("mnist_small")
    train, val = str(root / "train.zarr"), str(root / "val.zarr")
    ingest("mnist5k", train, limit=400, val_fraction=0.25, val_out=val, resize="8x8",
           preprocess="standardize", progress=False)
    return {"train": train, "val": val}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster (2 CPUs) for the whole session, started the way the library starts it."""
    from kernelscale.runtime import ensure_ray, shutdown_if_started

    info = ensure_ray(num_cpus=2)
    yield info
    shutdown_if_started(info)


@pytest.fixture(scope="session", autouse=True)
def jax_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One JAX persistent compilation cache for this test run, shared by the xdist workers, the CLI subprocesses
    and the Ray workers they start (through the environment). It starts empty in every run, as on a clean CI
    clone, and lives under pytest's base temp directory: the same kernels compiled by many tests compile once."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = root / "jax-compile-cache"
    cache.mkdir(exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return cache


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---- object storage: a real S3-compatible server (moto) on 127.0.0.1 -----------------------------------------
# The endpoint and credentials go into the standard environment variables at import time, before any Ray
# cluster starts, so Ray's worker processes inherit them exactly as they would on a real cluster node.
# Under pytest-xdist every worker inherits the controller's environment, so each worker picks its own port for
# its own server; an endpoint the user set (without our marker) is kept.
S3_PORT = free_port()
if "AWS_ENDPOINT_URL" not in os.environ or os.environ.get("KERNELSCALE_TEST_S3_ENDPOINT") == "1":
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"
    os.environ["KERNELSCALE_TEST_S3_ENDPOINT"] = "1"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "kernelscale-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "kernelscale-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def s3_bucket():
    """A fresh bucket on a moto S3 server listening on 127.0.0.1; yields its s3:// URL prefix."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    server = ThreadedMotoServer(ip_address=host, port=int(port), verbose=False)
    server.start()
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("kernelscale-test")
    yield "s3://kernelscale-test"
    server.stop()
