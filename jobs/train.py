"""Training job: `python jobs/train.py --config configs/wikimel.yaml [--set train.epochs=5]`.

Ray Train on the dataset's only complete feature set and mined negatives; logs the run to MLflow. Skipped when
a run with the same settings finished; a killed run resumes from its last checkpoint.
"""

import sys

from mel_ray import pipeline
from mel_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(pipeline.train_stage, __doc__))
