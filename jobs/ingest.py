"""Ingest job: `python jobs/ingest.py --config configs/wikimel.yaml [--set data.ingest.input=...]`.

Runs unchanged locally or as `ray job submit --working-dir . -- python jobs/ingest.py --config ...`.
Skips the work when the dataset is already complete (manifest.json present).
"""

import argparse
import sys

from mel_ray import storage
from mel_ray.cli import run_guarded
from mel_ray.config import load_config
from mel_ray.ingest import ingest, summary_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    out = cfg.data.dataset
    if storage.exists(storage.join(out, "manifest.json")):
        print(f"{out}: already ingested, skipping")
        return 0
    opts = cfg.data.ingest
    report = ingest(opts.format, opts.input, out, name=cfg.data.name, options=opts)
    print(summary_line(out, report))
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
