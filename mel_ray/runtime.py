"""Connecting to Ray the same way from every stage, locally and under `ray job submit`.

`ray job submit` sets RAY_ADDRESS for the entrypoint, so `ray.init()` joins the cluster; on one machine with
nothing running it starts a local instance (the embedded default). Token authentication stays on.
"""

from __future__ import annotations

import os


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
