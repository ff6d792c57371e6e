"""Pipeline job: `python jobs/pipeline.py --config configs/wikimel.yaml`: every stage, from one config.

ingest or merge -> mine negatives -> synthesize -> extract features -> train -> evaluate on test; finished
stages are skipped, so resubmitting a failed job continues where it stopped. One progress line per stage.
"""

import sys

from mel_ray import pipeline
from mel_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(pipeline.run_pipeline, __doc__))
