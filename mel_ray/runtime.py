"""Connecting to Ray the same way from every stage, locally and under `ray job submit`.

`ray job submit` sets RAY_ADDRESS for the entrypoint, so `ray.init()` joins the cluster; on one machine with
nothing running it starts a local instance (the embedded default). Token authentication stays on.
"""

from __future__ import annotations

import os

from mel_ray.errors import UsageError


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray instance; a no-op if Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    if "RAY_AUTH_MODE" not in os.environ:   # unset after `import mel_ray` by the caller: put it back on
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._raylet import Config  # ray caches the mode; refresh it as `ray start` does
        Config.initialize("")
    address = os.environ.get("RAY_ADDRESS") or None
    kwargs = {} if address else {"num_cpus": num_cpus, "include_dashboard": False}
    ray.init(address=address, log_to_driver=True, **kwargs)


def cpu_threads_per_worker() -> int:
    """Torch threads for one actor: CPU actors share the cores, and oversubscription makes them far slower."""
    return max(1, int(os.environ.get("MEL_RAY_TORCH_THREADS", "1")))


AUTOSCALING = "MEL_RAY_AUTOSCALING"


def cluster_may_grow() -> bool:
    """MEL_RAY_AUTOSCALING=1: the cluster adds nodes on demand, so its present size says nothing about what a
    stage can get (a GPU group that scales from zero reports no GPU until the first GPU actor is requested)."""
    return os.environ.get(AUTOSCALING) == "1"


def check_gpus(stage: str, num_gpus: float, setting: str) -> None:
    """Fail fast when GPU actors could never be placed, unless an autoscaler may still add GPU nodes (then the
    stage submits its actors and waits)."""
    import ray

    if num_gpus <= 0 or cluster_may_grow():
        return
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus < num_gpus:
        raise UsageError(f"{stage}: num_gpus={num_gpus:g} per actor but the Ray cluster has {gpus:g} GPUs (set "
                         f"{setting}=0 to run on CPUs; on an autoscaling cluster whose GPU nodes start at zero, "
                         f"export {AUTOSCALING}=1)")
