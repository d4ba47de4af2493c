"""Ray start/connect, shared by the Gram engine, the distributed operator and KIP.

Connects to an existing cluster when ``address`` or ``RAY_ADDRESS`` is given; otherwise starts a local one
bound to loopback, with no dashboard and no client server. Never re-initialises a running Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from kernelscale._compat import RAY_TOKEN_LOGGER, ray_single_machine_mode
from kernelscale.errors import InputError

log = logging.getLogger(__name__)

#: JAX settings for every actor process: no 75% GPU pre-allocation per process, no TF32 surprises.
ACTOR_ENV_VARS = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "XLA_PYTHON_CLIENT_ALLOCATOR": "platform",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


#: XLA CPU flags every kernelscale process gets (unless XLA_FLAGS already names them, or
#: KERNELSCALE_XLA_DEFAULTS=0). jaxlib 0.5's default "thunk" CPU runtime runs the kernels' fused elementwise
#: chains ~1.5x slower than the classic runtime (measured here: fc depth-3 NTK of a 1000 x 1000 block,
#: 0.040 s vs 0.025 s; values equal to 3e-7 relative). Only set for jaxlib < 0.6, which knows the flag.
XLA_CPU_FLAGS = {"--xla_cpu_use_thunk_runtime": "false"}


def xla_flags(current: str | None, jaxlib_version: str) -> str:
    """``current`` XLA_FLAGS plus kernelscale's CPU flags it does not already set."""
    flags = (current or "").split()
    major_minor = tuple(int(p) for p in jaxlib_version.split(".")[:2] if p.isdigit())
    if major_minor >= (0, 6):
        return " ".join(flags)
    named = {f.split("=")[0] for f in flags}
    flags += [f"{name}={value}" for name, value in XLA_CPU_FLAGS.items() if name not in named]
    return " ".join(flags)


def configure_xla() -> None:
    """Set kernelscale's XLA flags in this process's environment. Takes effect if JAX has not yet created its
    backend (it reads XLA_FLAGS then): ``import kernelscale`` calls it, before any kernel is built."""
    if os.environ.get("KERNELSCALE_XLA_DEFAULTS", "1") == "0":
        return
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        jaxlib_version = version("jaxlib")
    except PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS"), jaxlib_version)


def install_nt_stub() -> None:
    """Keep ``neural_tangents.experimental`` (which imports tensorflow) from loading.

    neural-tangents 0.6.5 imports its ``experimental`` subpackage from its ``__init__``; kernelscale never uses
    it and tensorflow is not installed. ``import kernelscale`` calls this, so a user's own module can do
    ``import neural_tangents.stax as stax`` afterwards. Nothing is done when tensorflow is installed or
    neural-tangents is already imported.
    """
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415

    if "neural_tangents" in sys.modules or "neural_tangents.experimental" in sys.modules:
        return
    if importlib.util.find_spec("tensorflow") is not None:
        return
    sys.modules["neural_tangents.experimental"] = types.ModuleType("neural_tangents.experimental")


def ensure_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> dict[str, Any]:
    """Make sure Ray is initialised; return ``{"address": ..., "started_local": bool}``.

    ``address`` (or ``RAY_ADDRESS``) connects to a running cluster. Otherwise a local cluster is started on
    127.0.0.1 without a dashboard. Library code calls this instead of ``ray.init()``.
    """
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return {"address": ray.get_runtime_context().gcs_address, "started_local": False}
    address = address or os.environ.get("RAY_ADDRESS") or None
    common: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": True,
        "configure_logging": True,
    }
    if address:
        auth = check_remote_auth(address)  # before connecting: token auth on, or a clear warning
        log.info("connecting to Ray cluster at %s (token auth %s)", address, auth)
        try:
            ray.init(address=address, runtime_env={"env_vars": dict(ACTOR_ENV_VARS)}, **common)
        except ray.exceptions.AuthenticationError as exc:
            raise InputError(f"the Ray cluster at {address} refused this client's token (RAY_AUTH_MODE={auth}): use the "
                             "cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; "
                             "cluster/README.md)") from None
        return {"address": address, "started_local": False, "auth": auth}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet_token_notice()
    log.info("starting a local Ray cluster on 127.0.0.1 (no dashboard)")
    # A local cluster's processes inherit this process's environment at start. Giving them the actor variables
    # that way, rather than as a job runtime_env, lets actors start in Ray's prestarted worker processes:
    # 0.06-0.3 s instead of 0.55 s per actor (measured), a seventh of a 10,000-row Gram. The driver's own
    # environment is restored right after.
    with _scoped_environ(ACTOR_ENV_VARS):
        _init_loopback(ray, num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **common)
    return {"address": ray.get_runtime_context().gcs_address, "started_local": True}




class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


def quiet_token_notice(token_file: str | None = None) -> bool:
    """Ray logs "Token authentication is enabled for this Ray cluster" at every local start. Once Ray has
    generated its token (``~/.ray/auth_token``, at the first start, which shows the notice once), drop that
    notice; token authentication itself is unchanged. Returns whether the notice is dropped."""
    token_file = token_file or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if not os.path.isfile(token_file):
        return False
    logger = logging.getLogger(RAY_TOKEN_LOGGER)
    if not any(isinstance(f, _DropTokenNotice) for f in logger.filters):
        logger.addFilter(_DropTokenNotice())
    return True


@contextlib.contextmanager
def _scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, and exactly as before after it."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def check_remote_auth(address: str, environ: Any = None, home: str | None = None) -> str:
    """Check this client's Ray token authentication before connecting to the cluster at ``address``.

    Returns ``"token"`` when ``RAY_AUTH_MODE=token`` and a token is at hand (``RAY_AUTH_TOKEN``, the file named by
    ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``), ``"off"`` otherwise, with one warning that the cluster is
    reachable without a token for a non-loopback address. Raises :class:`InputError` when token mode is on but no
    token can be read. Warns when the token file is readable by other users (it must be mode 600).
    """
    environ = os.environ if environ is None else environ
    if str(environ.get("RAY_AUTH_MODE", "")).lower() != "token":
        if not _is_loopback(address):
            log.warning("connecting to the Ray cluster at %s without token authentication (RAY_AUTH_MODE is not "
                        "'token' here): if the cluster runs without it too, anyone who can reach its ports can run "
                        "code on it. Start it with RAY_AUTH_MODE=token and use its token (cluster/README.md)", address)
        return "off"
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return "token"
    path = environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(home or os.path.expanduser("~"), ".ray", "auth_token")
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputError(f"RAY_AUTH_MODE=token but no token to connect to {address}: {path} is not readable "
                         f"({exc.strerror}); set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or write the cluster's token "
                         "to ~/.ray/auth_token (chmod 600)") from None
    if not token:
        raise InputError(f"RAY_AUTH_MODE=token but the token file {path} is empty; write the cluster's token there")
    if mode & 0o077:
        log.warning("the Ray token file %s is readable by other users (mode %o); run chmod 600 %s", path,
                    mode & 0o777, path)
    return "token"


def _init_loopback(ray: Any, **kwargs: Any) -> None:
    """``ray.init`` of a private local cluster whose servers all bind 127.0.0.1.

    Ray rewrites a node IP of 127.0.0.1 to the machine's routable address (and its gRPC servers then listen
    on every interface) unless its "single-machine" mode is on, which Ray reads from
    ``ray_constants.ENABLE_RAY_CLUSTER`` while it picks the node IP. We switch that mode on for the duration
    of the call only; the started processes receive 127.0.0.1 explicitly.
    """
    with ray_single_machine_mode():
        ray.init(_node_ip_address="127.0.0.1", **kwargs)


def cluster_slots(gpus_per_worker: float = 0.0) -> int:
    """How many workers the cluster can hold: GPUs / gpus_per_worker on GPU clusters, else CPUs."""
    import ray  # noqa: PLC0415

    res = ray.cluster_resources()
    if gpus_per_worker > 0:
        return max(1, int(res.get("GPU", 0) / gpus_per_worker))
    return max(1, int(res.get("CPU", 1)))


def actor_options(gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0) -> dict[str, Any]:
    """Ray actor options: one CPU slot (or a GPU share) per actor, restarted by Ray if its process dies."""
    opts: dict[str, Any] = {"num_cpus": cpus_per_worker, "max_restarts": -1, "max_task_retries": -1}
    if gpus_per_worker > 0:
        opts["num_gpus"] = gpus_per_worker
    return opts


def shutdown_if_started(info: dict[str, Any]) -> None:
    """Shut Ray down if :func:`ensure_ray` started it (leave a user's cluster alone)."""
    import ray  # noqa: PLC0415

    if info.get("started_local") and ray.is_initialized():
        ray.shutdown()
