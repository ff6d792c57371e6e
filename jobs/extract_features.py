"""Features job: `python jobs/extract_features.py --config configs/wikimel.yaml` encodes with frozen CLIP.

Entities, mentions and the synthetic views of the config's synthesize settings (run the synthesize job first)
go to DATASET/features/<key>/; shards already written are skipped.
"""

import sys

from mel_ray import pipeline
from mel_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(pipeline.features_stage, __doc__))
