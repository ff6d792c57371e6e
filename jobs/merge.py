"""Merge job: `python jobs/merge.py --config configs/wikidm.yaml` builds WikiDM / WikiDR from ingested parts.

Skips the work when the merged dataset is already complete (manifest.json present).
"""

import argparse
import sys

from mel_ray import storage
from mel_ray.cli import run_guarded
from mel_ray.config import load_config
from mel_ray.merge import merge


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    if not cfg.data.merge:
        print(f"{args.config}: data.merge lists no input datasets", file=sys.stderr)
        return 2
    out = cfg.data.dataset
    if storage.exists(storage.join(out, "manifest.json")):
        print(f"{out}: already merged, skipping")
        return 0
    manifest = merge(cfg.data.merge, out, name=cfg.data.name)
    print(f"merged {', '.join(cfg.data.merge)} -> {out}: {manifest['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
