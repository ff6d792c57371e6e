"""Evaluation job: `python jobs/evaluate.py --config configs/wikimel.yaml`: exact full-KB metrics on test.

Evaluates the best checkpoint of the run the train job made with this config and adds test_* metrics and
eval_test.json to its MLflow run; skipped when already done.
"""

import sys

from mel_ray import pipeline
from mel_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(pipeline.evaluate_stage, __doc__))
