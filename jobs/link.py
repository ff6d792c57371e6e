"""Link job: `python jobs/link.py --config C --set link.model=RUN_OR_MODEL --set link.kb=DATASET
--set link.mentions=FILE`.

Batch linking of new mentions (Parquet or JSONL: text, mention, optional image) against a KB with a trained
model: synthetic views, CLIP features and top-k scores over the whole KB as one Ray Data job; writes
link.output/links.parquet and link_report.json. Skipped when the same inputs were already linked.
"""

import sys

from mel_ray import pipeline
from mel_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(pipeline.link_stage, __doc__))
