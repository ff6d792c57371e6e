"""The preamble every `jobs/<stage>.py` shares: `--config`, `--set a.b=c`, `--debug`, and errors as one line.

It lives in the package rather than beside the jobs because `ray job submit --working-dir .` puts the working
dir on the driver's PYTHONPATH (so this module comes from the same upload as the job) while `python
jobs/x.py` puts only `jobs/` on sys.path: `mel_ray.jobs` imports the same way in both, a sibling module would
depend on the script's location.

Relative paths in the config are taken under the current directory (see mel_ray.pipeline). Under `ray job
submit` that is Ray's unpacked copy of the working dir on the head node, which goes away with the cluster:
on a cluster, point data.*, tracking.storage and models.* at s3:// or at a shared absolute path.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from mel_ray import console, redact
from mel_ray.cli import run_guarded
from mel_ray.config import Config, load_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config (configs/<dataset>.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--debug", action="store_true", help="show a traceback instead of the one-line error")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's, Train's, Tune's, Data's and the models' own output here, as it comes")
    p.add_argument("--log-file", help="where that output goes otherwise (default: logs/<job>.log under the "
                   "current directory: under `ray job submit`, Ray's copy of the working dir on the head node)")
    return p


def report(result: Any) -> None:
    """A stage's progress line, then its JSON summary as the last line (what scripts read)."""
    from mel_ray.pipeline import StageResult

    if isinstance(result, StageResult):
        print(result.line())
        result = result.summary()
    print(json.dumps(result, default=str), flush=True)


def job_name(stage: Callable) -> str:
    """pipeline.synthesize_stage -> "synthesize", pipeline.run_pipeline -> "pipeline": the log file's name."""
    return getattr(stage, "__name__", "job").removeprefix("run_").removesuffix("_stage")


def run_job(stage: Callable[[Config], Any], doc: str | None, argv: list[str] | None = None) -> int:
    """Parse the arguments, load the config and run `stage(config)`; returns the exit code (2: bad config or
    data, one line on stderr; --debug adds the traceback)."""
    def main(args_list: list[str] | None) -> int:
        args = parser((doc or "").strip().splitlines()[0] if doc else None).parse_args(args_list)
        cfg = load_config(args.config, args.set)
        name = job_name(stage)
        log_file = console.setup(args.log_file or console.default_log_file(".", name), verbose=args.verbose)
        if log_file is not None:
            print(f"[{name}] Ray's and the libraries' output -> {log_file} (--verbose: here)", flush=True)
        report(stage(cfg))
        return 0

    with redact.redacted_output():   # as mel-ray's CLI: no credential in anything the job prints, --verbose too
        return run_guarded(main, argv if argv is not None else sys.argv[1:])
