"""Mining job: `python jobs/mine_negatives.py --config configs/wikimel.yaml` writes negatives/k{K}.parquet.

Skips the work when the same pool (k, seed, entities hash) is already complete.
"""

import argparse
import json
import sys

from mel_ray.cli import run_guarded
from mel_ray.config import load_config
from mel_ray.negatives import mine_negatives


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    n = cfg.negatives
    manifest = mine_negatives(cfg.data.dataset, k=n.k, seed=n.seed, block_size=n.block_size)
    print(json.dumps({k: manifest.get(k) for k in ("output", "skipped", "n_entities", "n_without_attributes",
                                                  "n_short")}))
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
