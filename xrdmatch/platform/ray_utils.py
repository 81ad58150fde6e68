"""One way to reach Ray: a cluster when RAY_ADDRESS / config says so, else a local Ray."""

from __future__ import annotations

import os

#: Set in every Ray worker: BLAS/OpenMP oversubscription halves throughput on small machines.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to (or start) Ray once per process; idempotent.

    ``address`` (config) wins over ``RAY_ADDRESS``; with neither, a local Ray starts with
    ``num_cpus`` CPUs, its dashboard on 127.0.0.1, and single-threaded BLAS in its workers.
    """
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    addr = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if addr:
        ray.init(address=addr, runtime_env=runtime_env, log_to_driver=True)
    else:
        # address="local": never attach silently to a `ray start` cluster found in /tmp/ray;
        # joining a cluster is explicit (RAY_ADDRESS or ray.address in the config).
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls
        # (without it every Train run logs "State API may be temporarily unavailable" warnings).
        # Loopback only.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=None,  # started when its packages are installed (not in a minimal `ray`)
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
    return ray


def kill_actors(*actors) -> None:
    """Kill each actor now; one that is already gone is skipped (pools end this way, error or not)."""
    import ray

    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already gone
            pass


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def error_text(e: BaseException, limit: int = 300) -> str:
    """One line that says what went wrong in a Ray task or actor: the user's exception (its type
    and message), not Ray's header line (``ray::XRDWorker.run() (pid=..., ip=...)``)."""
    import re

    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        msg = str(cause).strip()
        line = f"{type(cause).__name__}: {msg.splitlines()[0]}" if msg else type(cause).__name__
    else:
        lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() if ln.strip()]
        line = f"{type(e).__name__}: {lines[-1]}" if lines else type(e).__name__
    return line[:limit]
