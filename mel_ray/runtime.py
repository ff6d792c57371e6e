"""Connecting to Ray the same way from every stage, locally and under `ray job submit`.

`ray job submit` sets RAY_ADDRESS for the entrypoint, so `ray.init()` joins the cluster; on one machine with
nothing running it starts a local instance (the embedded default). Token authentication stays on.
"""

from __future__ import annotations

import logging
import os

from mel_ray.errors import UsageError


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray instance; a no-op if Ray is already up.

    Workers' output reaches this process only with --verbose (mel_ray.console): otherwise it stays in the Ray
    session's logs, whose folder the run's log file names. A local instance runs the dashboard (on 127.0.0.1
    only) because it serves Ray's State API: Ray Train's PlacementGroupCleaner asks it every second whether the
    training controller is alive, and without it logs "Failed to query Ray Train Controller actor state" each
    time and could never remove the placement group of a controller that died.
    """
    import ray
    import ray.data  # configures the ray.data logger, which console.tidy then moves to the log file

    from mel_ray import console

    console.tidy()
    if ray.is_initialized():
        return
    if "RAY_AUTH_MODE" not in os.environ:   # unset after `import mel_ray` by the caller: put it back on
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._raylet import Config  # ray caches the mode; refresh it as `ray start` does
        Config.initialize("")
    address = os.environ.get("RAY_ADDRESS") or None
    kwargs = {} if address else {"num_cpus": num_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    # workers' output here only with --verbose, or where no log file says where Ray's logs are (library use)
    log_to_driver = console.is_verbose() or console.log_file() is None
    context = ray.init(address=address, log_to_driver=log_to_driver, **kwargs)
    logging.getLogger(__name__).info("Ray %s: session logs (workers' output) under %s", context.address_info.get(
        "gcs_address"), context.address_info.get("session_dir"))
    quiet_ray_data()
    if not log_to_driver:
        route_raylet_notices()


# Raylet notices that Ray pushes to every driver's terminal (even with log_to_driver=False) and that say nothing
# a user can act on: on a small node, the Python workers of Ray Train, Ray Data and Tune start faster than the
# node's CPU count, and the raylet warns each time the count passes another multiple of it.
HARMLESS_RAYLET_NOTICES = ("PYTHON worker processes have been started on node",)


def route_raylet_notices() -> None:
    """Send the HARMLESS_RAYLET_NOTICES to the log file (this module's logger, INFO) instead of the terminal;
    every other raylet notice (out-of-memory kills, dead workers) still reaches the terminal. Ray prints them
    from its error-listener thread through `ray._private.worker.print_to_stdstream`, which has no setting, so
    that one function is wrapped (a no-op if a Ray version no longer has it)."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "routes_raylet_notices", False):
        return
    notices = logging.getLogger(__name__)

    def print_to_stdstream(data, *args, **kwargs):
        lines = data.get("lines") if isinstance(data, dict) and data.get("pid") == "raylet" else None
        if lines:
            harmless = [line for line in lines if any(n in str(line) for n in HARMLESS_RAYLET_NOTICES)]
            for line in harmless:
                notices.info("(raylet) %s", line)
            if len(harmless) == len(lines):
                return None
            data = {**data, "lines": [line for line in lines if line not in harmless]}
        return original(data, *args, **kwargs)

    print_to_stdstream.routes_raylet_notices = True
    ray_worker.print_to_stdstream = print_to_stdstream


def quiet_ray_data() -> None:
    """On an interactive terminal, one live Ray Data bar per dataset (not one per operator); elsewhere Ray Data
    logs its progress (into the log file)."""
    from ray.data import DataContext

    from mel_ray import console

    if console.interactive() and not console.is_verbose():
        DataContext.get_current().enable_operator_progress_bars = False


def cpu_threads_per_worker() -> int:
    """Torch threads for one actor: CPU actors share the cores, and oversubscription makes them far slower."""
    return max(1, int(os.environ.get("MEL_RAY_TORCH_THREADS", "1")))


AUTOSCALING = "MEL_RAY_AUTOSCALING"


def cluster_may_grow() -> bool:
    """MEL_RAY_AUTOSCALING=1: the cluster adds nodes on demand, so its present size says nothing about what a
    stage can get (a GPU group that scales from zero reports no GPU until the first GPU actor is requested)."""
    return os.environ.get(AUTOSCALING) == "1"


AUTO = "auto"


def cluster_gpus() -> float:
    """GPUs in the Ray cluster now (Ray is started or joined first)."""
    import ray

    init_ray()
    return float(ray.cluster_resources().get("GPU", 0))


def resolve_num_gpus(stage: str, value: float | str, setting: str) -> float:
    """GPUs per actor for a stage's actor pool; the one rule for synthesize, extract-features and link.

    "auto" (the default): 1 where the cluster has a GPU, or may get one (MEL_RAY_AUTOSCALING=1: the autoscaler
    adds GPU nodes when GPU actors are requested), else 0, i.e. CPU actors. A number is used as given, after
    check_gpus' strict check: asking for GPUs the cluster does not have is an error, not a silent CPU run.
    """
    if isinstance(value, str):
        if value != AUTO:
            raise UsageError(f"{stage}: {setting}={value!r}: expected '{AUTO}' or a number of GPUs per actor")
        return 1.0 if cluster_may_grow() or cluster_gpus() >= 1 else 0.0
    num_gpus = float(value)
    if num_gpus < 0:
        raise UsageError(f"{stage}: {setting}={num_gpus:g}: must not be negative")
    check_gpus(stage, num_gpus, setting)
    return num_gpus


def device_note(num_gpus: float) -> str:
    """What a stage's line says about where its actors run."""
    return f"{num_gpus:g} GPU per actor" if num_gpus > 0 else "CPU"


def check_gpus(stage: str, num_gpus: float, setting: str) -> None:
    """Fail fast when GPU actors could never be placed, unless an autoscaler may still add GPU nodes (then the
    stage submits its actors and waits)."""
    if num_gpus <= 0 or cluster_may_grow():
        return
    gpus = cluster_gpus()
    if gpus < num_gpus:
        raise UsageError(f"{stage}: num_gpus={num_gpus:g} per actor but the Ray cluster has {gpus:g} GPUs (set "
                         f"{setting}=0 to run on CPUs; on an autoscaling cluster whose GPU nodes start at zero, "
                         f"export {AUTOSCALING}=1)")


def job_placement_groups() -> set[str]:
    """Ids of this job's live placement groups (a placement group id ends with its creator's job id)."""
    import ray
    from ray.util.placement_group import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    return {pg for pg, entry in placement_group_table().items() if entry["state"] == "CREATED" and pg.endswith(job)}


def release_placement_groups(before: set[str], what: str) -> int:
    """Remove this job's placement groups created since `before` that are still reserved once `what` is over.

    Why: a Tune trial whose Ray Train run failed can leave its worker group's placement group reserved after the
    trial has ended (Ray 2.60: its PlacementGroupCleaner waits for a controller that never exits), holding those
    CPUs for the rest of the driver's life; on a small cluster every later Ray Data read then waits forever.
    Called only when nothing started by `what` runs any more, so whatever it left reserved is a leak."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    leaked = sorted(job_placement_groups() - before)
    for pg in leaked:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg))))
    if leaked:
        logging.getLogger(__name__).info("%s: released %d placement group(s) its runs left reserved", what,
                                         len(leaked))
    return len(leaked)
