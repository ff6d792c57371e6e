"""Synthesis job: `python jobs/synthesize.py --config configs/wikimel.yaml` draws the CVaCPT views.

models.diffusion draws synthesize.views images per mention into DATASET/synthetic/<key>/; images already
there are skipped.
"""

import sys

from mel_ray import pipeline
from mel_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(pipeline.synthesize_stage, __doc__))
