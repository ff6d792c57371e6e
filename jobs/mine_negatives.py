"""Mining job: `python jobs/mine_negatives.py --config configs/wikimel.yaml` writes negatives/k{K}.parquet.

Skipped when the same pool (k, seed, entities hash) is already complete.
"""

import sys

from mel_ray import pipeline
from mel_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(pipeline.negatives_stage, __doc__))
