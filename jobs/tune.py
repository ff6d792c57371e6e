"""Tune job: `python jobs/tune.py --config configs/tune/wikimel.yaml`: the paper's Table 2 as a Ray Tune sweep.

The sweep's inputs first (ingest or merge, one mined pool, one synthesis run with the most views, features;
each skipped when complete), then a grid of distributed training trials (tune.*) with an MLflow parent run,
a child run per trial, the ablation table and heatmaps. An interrupted sweep resumes (Tuner.restore).
"""

import sys

from mel_ray import pipeline
from mel_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(pipeline.run_tune_pipeline, __doc__))
