"""Quiet runs (mel_ray.console: the page on the terminal, the rest in a log file) and `num_gpus: auto`
(mel_ray.runtime.resolve_num_gpus)."""

from __future__ import annotations

import logging

import pytest

from mel_ray import cli, console
from mel_ray.config import load_config
from mel_ray.errors import UsageError
from mel_ray.jobs import job_name
from mel_ray.runtime import AUTOSCALING, resolve_num_gpus

TORCHVISION = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
               "for backward compatibility.")


@pytest.fixture
def routed(tmp_path):
    path = console.setup(tmp_path / "logs" / "run.log")
    yield path
    console.reset()


def test_library_output_goes_to_the_log_file_and_mel_ray_warnings_to_the_terminal(routed, capfd):
    own = logging.getLogger("ray.data")                 # as Ray Data configures itself: own handler, no propagation
    own.propagate = False
    own.addHandler(logging.StreamHandler())
    console.tidy()
    own.info("Progress will be logged because stdout is a non-interactive terminal.")
    logging.getLogger("ray.tune").warning("tune says something")
    logging.getLogger("mlflow.store").info("creating tables")
    logging.getLogger("transformers.utils.import_utils").warning(TORCHVISION)
    logging.getLogger("mel_ray.demo").info("synthesize: 10/20 images")
    logging.getLogger("mel_ray.demo").warning("a warning of ours")
    logging.getLogger("some_library.train").error("a failed run")     # a library logger that propagates
    err = capfd.readouterr().err
    assert "a warning of ours" in err and "a failed run" in err
    for quiet in ("Progress will be logged", "tune says something", "creating tables", "torchvision", "10/20"):
        assert quiet not in err
    text = routed.read_text()
    for logged in ("Progress will be logged", "tune says something", "creating tables", "10/20", "a failed run"):
        assert logged in text
    assert "torchvision" not in text          # the intended PIL fallback (see console._TorchvisionFallbackFilter)
    assert not [h for h in own.handlers if type(h) is logging.StreamHandler]


def test_harmless_raylet_notices_go_to_the_log_file_and_the_others_to_the_terminal(routed, capfd, monkeypatch):
    import ray._private.worker as ray_worker

    from mel_ray.runtime import route_raylet_notices

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)   # restored afterwards
    route_raylet_notices()
    wrapped = ray_worker.print_to_stdstream
    route_raylet_notices()                    # a second init_ray in one process does not wrap it twice
    assert ray_worker.print_to_stdstream is wrapped
    startup = ("WARNING: 12 PYTHON worker processes have been started on node: abc with address: 127.0.0.1, which "
               "is 6x the maximum expected startup concurrency (2).")
    oom = "Task was killed due to the node running low on memory (a test line 4711)."
    # as Ray's error-listener thread calls it
    ray_worker.print_to_stdstream({"lines": [startup, oom], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": [startup], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capfd.readouterr().out
    assert "a test line 4711" in out and "PYTHON worker processes" not in out
    assert routed.read_text().count("PYTHON worker processes have been started") == 2


def test_verbose_keeps_everything_on_the_terminal(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(console.VERBOSE, "0")   # recorded, so setup(verbose=True) setting it is undone
    try:
        assert console.setup(tmp_path / "x.log", verbose=True) is None
        # a library logger that propagates to the root (Ray's own handlers hold whatever stderr was at import
        # time, which under pytest is an earlier test's capture)
        logging.getLogger("some_library.module").info("a library says something")
        assert "a library says something" in capfd.readouterr().err
        assert not (tmp_path / "x.log").exists()
    finally:
        console.reset()


@pytest.mark.parametrize("verbose", [False, True])
def test_every_handler_redacts_credentials_tracebacks_included(tmp_path, capfd, verbose):
    """setup() alone (as jobs call it, without the CLI's install_log_filter): what the log file and the terminal
    get has no credential, neither in a message, nor in a logged traceback (how Ray reports a failed actor), nor
    from a library logger that tidy() routes to the file."""
    secret, slashed = "S3cretLEAK42", "pa/ss5LEAK"          # a secret holding "/" (issue 22) too
    uri, other = f"s3://AKIAKEY:{secret}@bucket/x.png", f"http://alice:{slashed}@127.0.0.1:9/x.png"
    path = console.setup(tmp_path / "logs" / "link.log", verbose=verbose)
    try:
        # quiet: Ray Data's logger, which tidy() routes to the file; verbose: one that propagates to the terminal
        # (Ray's own console handlers are left alone then; the CLI redacts the streams they write to)
        own = logging.getLogger("some_library.data" if verbose else "ray.data")
        propagate, own.propagate = own.propagate, verbose
        console.tidy()
        logging.getLogger("mel_ray.link").warning("image %s is a folder", uri)
        try:
            raise OSError(f"could not read {other}")
        except OSError:
            own.exception("an actor failed")                   # message clean, the traceback holds the URI
            logging.getLogger("some_library").exception("failed")
        written = capfd.readouterr().err + (path.read_text() if path else "")
    finally:
        console.reset()
        own.propagate = propagate
    assert "is a folder" in written and "an actor failed" in written and "could not read" in written
    assert secret not in written and slashed not in written and "AKIAKEY" not in written
    assert "[redacted]@bucket/x.png" in written and "[redacted]@127.0.0.1:9/x.png" in written


def test_cli_and_jobs_pick_their_log_file(tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["demo", "--output", str(tmp_path / "out")])
    assert cli.log_file_for(args) == str(tmp_path / "out" / "logs" / "demo.log")
    args = parser.parse_args(["pipeline", "--root", str(tmp_path)])
    assert cli.log_file_for(args) == str(tmp_path / "logs" / "pipeline.log")
    args = parser.parse_args(["tune", "--log-file", str(tmp_path / "t.log")])
    assert cli.log_file_for(args) == str(tmp_path / "t.log")
    assert cli.log_file_for(parser.parse_args(["info", "x"])) is None            # no Ray: stderr, as always
    assert parser.parse_args(["--verbose", "tune"]).verbose and parser.parse_args(["tune", "--verbose"]).verbose

    from mel_ray import pipeline

    assert [job_name(f) for f in (pipeline.run_pipeline, pipeline.synthesize_stage, pipeline.run_tune_pipeline)] \
        == ["pipeline", "synthesize", "tune_pipeline"]


# ------------------------------------------------------------------------------------------ num_gpus: auto


def test_num_gpus_settings_are_auto_or_a_number():
    cfg = load_config()
    assert cfg.synthesize.num_gpus == "auto" and cfg.features.num_gpus == "auto"
    cfg = load_config(None, ["synthesize.num_gpus=0", "features.num_gpus=0.5"])
    assert cfg.synthesize.num_gpus == 0.0 and cfg.features.num_gpus == 0.5
    for bad in ("-1", "gpu", "true"):
        with pytest.raises(UsageError, match=r"'synthesize.num_gpus': .*(expected 'auto' or a number|got a boolean)"):
            load_config(None, [f"synthesize.num_gpus={bad}"])


def test_auto_means_one_gpu_on_an_autoscaling_cluster_without_asking_it(monkeypatch):
    monkeypatch.setenv(AUTOSCALING, "1")        # GPU nodes may be added on demand: ask for one, Ray waits
    assert resolve_num_gpus("synthesize", "auto", "synthesize.num_gpus") == 1.0
    assert resolve_num_gpus("synthesize", 2, "synthesize.num_gpus") == 2.0
    with pytest.raises(UsageError, match="expected 'auto' or a number"):
        resolve_num_gpus("synthesize", "gpu", "synthesize.num_gpus")


def test_auto_follows_the_cluster_and_a_number_is_checked(ray_local, monkeypatch):
    import ray

    monkeypatch.delenv(AUTOSCALING, raising=False)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    assert resolve_num_gpus("synthesize", "auto", "synthesize.num_gpus") == (1.0 if gpus >= 1 else 0.0)
    assert resolve_num_gpus("synthesize", 0, "synthesize.num_gpus") == 0.0
    with pytest.raises(UsageError, match=r"synthesize: num_gpus=\d+ per actor but the Ray cluster has .* GPUs"):
        resolve_num_gpus("synthesize", gpus + 1, "synthesize.num_gpus")


def test_the_synthesis_key_names_the_resolved_device_not_auto(ray_local, monkeypatch):
    from mel_ray.config import SynthesizeConfig
    from mel_ray.synthesize import synthesis_key, synthesis_settings

    monkeypatch.delenv(AUTOSCALING, raising=False)
    chosen = resolve_num_gpus("synthesize", "auto", "synthesize.num_gpus")
    auto = synthesis_settings("procedural:demo", SynthesizeConfig(size=64, num_gpus="auto"))
    explicit = synthesis_settings("procedural:demo", SynthesizeConfig(size=64, num_gpus=chosen))
    assert synthesis_key(auto) == synthesis_key(explicit)
    assert auto["device"] == ("cuda" if chosen else "cpu")
