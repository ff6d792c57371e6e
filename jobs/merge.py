"""Merge job: `python jobs/merge.py --config configs/wikidm.yaml` builds WikiDM / WikiDR from ingested parts.

Merges the datasets in data.merge into data.dataset; skipped when that is a complete merge of the same inputs.
"""

import sys

from mel_ray import pipeline
from mel_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(pipeline.merge_stage, __doc__))
