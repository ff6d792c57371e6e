"""`mel-ray` command line: one sub-command per pipeline stage.

Data errors print ONE line naming file, record and field, and exit with code 2; `--debug` shows the
traceback instead. Each sub-command is a thin wrapper over a plain function in its stage module.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from mel_ray import __version__
from mel_ray.errors import DataError, UsageError
from mel_ray.storage import StorageError

EXIT_DATA = 2
EXIT_STORAGE = 1


def _cmd_ingest(args: argparse.Namespace) -> int:
    from mel_ray.config import load_config
    from mel_ray.ingest import ingest, summary_line

    cfg = load_config(args.config, args.set).data.ingest
    if args.check_images:
        cfg.check_images = True
    if args.reference_images:
        cfg.copy_images = False
    if args.image_dir:
        cfg.image_dir = args.image_dir
    report = ingest(args.format, args.input, args.output, name=args.name, options=cfg)
    print(summary_line(args.output, report))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from mel_ray.merge import merge

    manifest = merge(args.inputs, args.output, name=args.name)
    print(json.dumps({"output": args.output, **manifest["counts"], "name": manifest["name"]}))
    return 0


def _cmd_make_tiny_models(args: argparse.Namespace) -> int:
    from mel_ray.tiny_models import make_tiny_models

    paths = make_tiny_models(args.output, seed=args.seed)
    print(json.dumps(paths))
    return 0


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from mel_ray.demo_data import make_demo_data

    stats = make_demo_data(args.output, n_entities=args.entities, n_mentions=args.mentions, seed=args.seed)
    print(json.dumps(stats))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mel_ray.demo import run_demo

    run_demo(args.output, config_path=args.config, overrides=args.set, until=args.until)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from mel_ray.config import load_config
    from mel_ray.pipeline import run_pipeline

    result = run_pipeline(load_config(args.config, args.set), root=args.root)
    print(json.dumps(result["stages"], default=str))
    return 0


def _cmd_mine_negatives(args: argparse.Namespace) -> int:
    from mel_ray.config import load_config
    from mel_ray.negatives import mine_negatives

    cfg = load_config(args.config, args.set).negatives
    manifest = mine_negatives(args.dataset, k=args.k if args.k is not None else cfg.k,
                              seed=args.seed if args.seed is not None else cfg.seed,
                              block_size=args.block_size or cfg.block_size, num_workers=args.workers,
                              force=args.force)
    print(json.dumps(manifest, default=str))
    return 0


def _cmd_synthesize(args: argparse.Namespace) -> int:
    from mel_ray.config import load_config
    from mel_ray.synthesize import synthesize

    c = load_config(args.config, args.set)
    s = c.synthesize
    summary = synthesize(args.dataset, args.model or c.models.diffusion,
                         views=args.views if args.views is not None else s.views, template=s.template,
                         steps=s.steps, guidance=s.guidance, size=s.size, scheduler=s.scheduler, seed=s.seed,
                         batch_size=s.batch_size, concurrency=s.concurrency, num_gpus=s.num_gpus,
                         limit=args.limit, cache_dir=c.models.cache_dir)
    print(json.dumps(summary, default=str))
    return 0


def _cmd_show_views(args: argparse.Namespace) -> int:
    from mel_ray.synthesize import show_views

    print(show_views(args.dataset, args.key, args.mention, args.output))
    return 0


def _cmd_extract_features(args: argparse.Namespace) -> int:
    from mel_ray.config import load_config
    from mel_ray.features import extract_features

    c = load_config(args.config, args.set)
    f = c.features
    manifest = extract_features(args.dataset, args.model or c.models.clip, synthetic_key=args.synthetic,
                                text_length=f.text_length, batch_size=f.batch_size, concurrency=f.concurrency,
                                num_gpus=f.num_gpus, cache_dir=c.models.cache_dir)
    print(json.dumps({"uri": manifest["uri"], "key": manifest["key"], "run": manifest["run"]}))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mel_ray.config import load_config
    from mel_ray.train.run import train

    cfg = load_config(args.config, args.set)
    result = train(cfg, args.dataset or cfg.data.dataset, features_uri=args.features, negatives_uri=args.negatives,
                   run_name=args.run_name)
    print(json.dumps({k: result[k] for k in ("run_id", "tracking_uri", "best", "checkpoint")}, default=str))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from mel_ray import pipeline
    from mel_ray.config import load_config

    cfg = load_config(args.config, args.set)
    if args.dataset:
        cfg.data.dataset = args.dataset
    result = pipeline.tune_stage(cfg, root=args.root, features=args.features)
    print(result.line())
    print(json.dumps(result.summary(), default=str))
    return 0


def _cmd_link(args: argparse.Namespace) -> int:
    from mel_ray import pipeline
    from mel_ray.config import load_config

    cfg = load_config(args.config, args.set)
    for name in ("model", "kb", "mentions", "output", "top_k"):
        if getattr(args, name) is not None:
            setattr(cfg.link, name, getattr(args, name))
    result = pipeline.link_stage(cfg, root=".")
    print(result.line())
    print(json.dumps(result.summary(), default=str))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mel_ray.eval.evaluate import evaluate, format_table
    from mel_ray.train.run import find_features

    features = find_features(args.dataset, args.features)
    report = evaluate(args.dataset, features, args.checkpoint, args.split, output_uri=args.output,
                      num_shards=args.shards)
    print(format_table(report))
    print(f"same-name failures: {report['same_name_failures']['count']} of "
          f"{report['same_name_failures']['of_wrong_top1']} wrong top-1")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from mel_ray.dataset import load_dataset

    ds = load_dataset(args.dataset)
    print(json.dumps(ds.manifest, indent=2))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from mel_ray.verify import summary_line, verify_with_summary

    problems, summary = verify_with_summary(args.dataset, deep=args.deep)
    for problem in problems:
        print(problem.line())
    if problems:
        print(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in {args.dataset}")
        return EXIT_DATA
    print(summary_line(args.dataset, summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mel-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mel-ray {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (configs/*.yaml); defaults follow the paper")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", parents=[common], help="convert a MEL release into the canonical dataset")
    p.add_argument("--format", required=True, choices=["mimic", "melbench", "jsonl"])
    p.add_argument("--input", required=True, help="source folder (mimic, jsonl) or JSON file (melbench)")
    p.add_argument("--output", required=True, help="dataset URI (local path or s3://bucket/prefix)")
    p.add_argument("--name", help="dataset name (default: the output folder's name)")
    p.add_argument("--image-dir", help="melbench: folder of mention images")
    p.add_argument("--check-images", action="store_true", help="decode every image; count and drop corrupt ones")
    p.add_argument("--reference-images", action="store_true",
                   help="reference source images by absolute URI instead of copying them")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("merge", parents=[common], help="merge datasets into one large-KB dataset (WikiDM, WikiDR)")
    p.add_argument("inputs", nargs="+", help="dataset URIs; the first wins on conflicting entity fields")
    p.add_argument("--output", required=True)
    p.add_argument("--name")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("make-tiny-models", parents=[common], help="build tiny offline CLIP and Stable Diffusion")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny_models)

    p = sub.add_parser("make-demo-data", parents=[common], help="generate a small MEL release in mimic format")
    p.add_argument("--output", required=True)
    p.add_argument("--entities", type=int, default=400)
    p.add_argument("--mentions", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_demo_data)

    p = sub.add_parser("demo", parents=[common], help="run the whole demo on the embedded default")
    p.add_argument("--output", default="demo_out")
    p.add_argument("--until", default="tune", choices=["data", "features", "train", "tune"],
                   help="stop after this part of the pipeline")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pipeline", parents=[common], help="every stage from one config (what jobs/pipeline.py runs)")
    p.add_argument("--root", default=".", help="folder that relative paths in the config are under (default: .)")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("mine-negatives", parents=[common], help="JD-CCL: exact top-k Jaccard hard negatives")
    p.add_argument("--dataset", required=True)
    p.add_argument("--k", type=int, help="pool size k_max (default: negatives.k)")
    p.add_argument("--seed", type=int, help="tie-break seed (default: negatives.seed)")
    p.add_argument("--workers", type=int, help="Ray actors (default: one per CPU; 0 = no Ray)")
    p.add_argument("--block-size", type=int, help="query entities per Ray Data block (default: negatives.block_size)")
    p.add_argument("--force", action="store_true", help="recompute even if the same pool is complete")
    p.set_defaults(func=_cmd_mine_negatives)

    p = sub.add_parser("synthesize", parents=[common], help="CVaCPT: draw synthetic views of every mention")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", help="diffusion model id or path (default: models.diffusion); 'procedural:demo' "
                   "is a TEST TOOL for generated demo data, not a model (see mel_ray/procedural.py)")
    p.add_argument("--views", type=int, help="n_s (default: synthesize.views)")
    p.add_argument("--limit", type=int, help="only the first N mentions of each split")
    p.set_defaults(func=_cmd_synthesize)

    p = sub.add_parser("show-views", parents=[common], help="a PNG grid of mentions and their synthetic views")
    p.add_argument("--dataset", required=True)
    p.add_argument("--key", help="synthetic/<key> (default: the only one)")
    p.add_argument("--mention", action="append", required=True, help="mention id (repeatable)")
    p.add_argument("--output", default="views.png")
    p.set_defaults(func=_cmd_show_views)

    p = sub.add_parser("extract-features", parents=[common], help="frozen CLIP features (MIMIC's inputs)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", help="CLIP id or path (default: models.clip)")
    p.add_argument("--synthetic", help="synthetic/<KEY> whose views to encode")
    p.set_defaults(func=_cmd_extract_features)

    p = sub.add_parser("train", parents=[common], help="distributed JD-CCL + CVaCPT training on Ray Train")
    p.add_argument("--dataset", help="default: data.dataset")
    p.add_argument("--features", help="features/<key> URI (default: the only one)")
    p.add_argument("--negatives", help="negatives/k{K}.parquet URI (default: from negatives.k)")
    p.add_argument("--run-name", default="train")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tune", parents=[common], help="Ray Tune sweep of training runs over k x n_s (tune.*)")
    p.add_argument("--dataset", help="default: data.dataset")
    p.add_argument("--features", help="features/<key> URI (default: the only one)")
    p.add_argument("--root", default=".", help="folder that relative paths in the config are under (default: .)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("link", parents=[common], help="link new mentions against a KB with a trained model")
    p.add_argument("--model", help="model.pt, an MLflow run id (runs:/<id>) or a checkpoint folder (link.model)")
    p.add_argument("--kb", help="KB dataset URI with features from the model's CLIP (link.kb)")
    p.add_argument("--mentions", help=".parquet or .jsonl: text, mention, optional image / mention_id")
    p.add_argument("--output", help="folder or s3:// prefix for links.parquet + link_report.json")
    p.add_argument("--top-k", dest="top_k", type=int, help="entities per mention (default 10)")
    p.set_defaults(func=_cmd_link)

    p = sub.add_parser("evaluate", parents=[common], help="exact full-KB ranking metrics")
    p.add_argument("--dataset", required=True)
    p.add_argument("--checkpoint", required=True, help="model.pt or a training checkpoint folder")
    p.add_argument("--features", help="features/<key> URI (default: the only one)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--shards", type=int, default=2, help="KB shards (Ray actors)")
    p.add_argument("--output", help="where to write predictions_<split>.parquet and eval_<split>.json")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("info", parents=[common], help="print a dataset's manifest")
    p.add_argument("dataset")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("verify", parents=[common], help="check a whole dataset tree: one line per problem, exit 2")
    p.add_argument("dataset")
    p.add_argument("--deep", action="store_true", help="also sha256 of every synthetic view, full decode of feature "
                   "shards, absolute image URIs")
    p.set_defaults(func=_cmd_verify)
    return parser


def run_guarded(func, argv: list[str] | None = None, debug: bool | None = None) -> int:
    """Run `func(argv)`; data/usage errors become one stderr line and exit 2 (traceback with --debug)."""
    if debug is None:
        debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return func(argv) or 0
    except (DataError, UsageError) as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DATA
    except StorageError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_STORAGE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_guarded(lambda _argv: args.func(args), argv, debug=args.debug)

if __name__ == "__main__":
    sys.exit(main())
