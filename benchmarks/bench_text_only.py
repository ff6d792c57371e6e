"""CPU cost of one text-only unit of extract-features (micro_batch rows, none with an image): the decode stage
(`prepare_unit`) and the encoder (`Encoder.encode`), and the pixel bytes shipped between them.

Run by hand (not a test), once per code version to compare (e.g. an older commit checked out with
`git worktree add /tmp/old <commit>`; this script runs against either):

    PYTHONPATH=/tmp/old .venv/bin/python benchmarks/bench_text_only.py --clip CLIP --text-encoder MINILM
    .venv/bin/python benchmarks/bench_text_only.py --clip CLIP --text-encoder MINILM

CPU seconds of this process (time.process_time, one torch thread), median over --reps units after two warm-up
units: on a shared machine they move much less than wall time.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clip", required=True, help="CLIP folder (its image tower and processor)")
    p.add_argument("--text-encoder", default=None, help="models.text_encoder (default: CLIP's text tower)")
    p.add_argument("--rows", type=int, default=32, help="rows per unit (micro_batch)")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()

    import torch

    import mel_ray
    from mel_ray.features import Encoder, load_processor, mention_text, output_size, prepare_unit, tokenize
    from mel_ray.models import DEFAULT_CACHE, load_text_tokenizer

    tokenizer, cfg = load_processor(args.clip, DEFAULT_CACHE)
    if args.text_encoder:
        tokenizer = load_text_tokenizer(args.text_encoder, DEFAULT_CACHE)
    size = output_size(cfg)
    shared_blank = "image_cfg" in inspect.signature(Encoder).parameters      # this change or later
    encoder = Encoder(args.clip, DEFAULT_CACHE, None, False, size, 40, None, args.text_encoder, None, "mean",
                      **({"image_cfg": cfg} if shared_blank else {}))
    torch.set_num_threads(1)
    ids, mask = tokenize(tokenizer, [mention_text("word", "a sentence of some twenty words " * 3)] * args.rows, 40)
    prepare, encode = [], []
    for rep in range(args.reps + 2):
        t0 = time.process_time()
        unit = prepare_unit({"i": [None] * args.rows}, image_cfg=cfg, image_size=size)
        t1 = time.process_time()
        extra = (unit["has_image"],) if shared_blank else ()
        encoder.encode(ids.astype(np.int64), mask, unit["pixels"], args.rows, *extra)
        t2 = time.process_time()
        if rep >= 2:
            prepare.append(t1 - t0)
            encode.append(t2 - t1)
    print(f"{mel_ray.__file__.rsplit('/mel_ray/', 1)[0]}: {args.clip}: {args.rows} rows per unit, pixels shipped "
          f"{unit['pixels'].nbytes} B, prepare_unit {statistics.median(prepare) * 1000:.1f} ms, encode "
          f"{statistics.median(encode) * 1000:.1f} ms (CPU, median of {args.reps})")


if __name__ == "__main__":
    main()
