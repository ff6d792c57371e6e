"""Ingest job: `python jobs/ingest.py --config configs/wikimel.yaml [--set data.ingest.input=...]`.

Reads data.ingest (format, input, options) and writes data.dataset; skipped when that dataset is complete and
was ingested from the same input with the same options. Also `ray job submit --working-dir . -- python ...`.
"""

import sys

from mel_ray import pipeline
from mel_ray.jobs import run_job

if __name__ == "__main__":
    sys.exit(run_job(pipeline.ingest_stage, __doc__))
