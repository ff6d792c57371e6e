"""`mel-ray` command line: one sub-command per pipeline stage.

Data errors print ONE line naming file, record and field, and exit with code 2; `--debug` shows the
traceback instead. A sub-command with a pipeline stage (ingest, merge, mine-negatives, synthesize,
extract-features, train, tune, link) runs the very `mel_ray.pipeline.*_stage` its job runs, with its flags
applied as config overrides (e.g. `--dataset` -> data.dataset), so both write the same output key for the
same config; the others are thin wrappers over a plain function in their stage module.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from mel_ray import __version__
from mel_ray.args import count
from mel_ray.errors import DataError, UsageError, unwrap
from mel_ray.storage import StorageError

EXIT_DATA = 2
EXIT_STORAGE = 1


def _config(args: argparse.Namespace, **flags):
    """The config of --config and --set, then the sub-command's flags as overrides (`section.field` -> value;
    a None value is a flag not given and leaves the config's value)."""
    from pydantic import ValidationError

    from mel_ray.config import load_config

    cfg = load_config(args.config, args.set)
    for dotted, value in flags.items():
        if value is None:
            continue
        *path, name = dotted.split(".")
        section = cfg
        for part in path:
            section = getattr(section, part)
        try:
            setattr(section, name, value)      # validated (the config's validate_assignment)
        except ValidationError as err:
            raise UsageError(f"{dotted}: {err.errors()[0]['msg']} (got {value!r})") from None
    return cfg


def _here(value: str | None) -> str | None:
    """A path flag as the caller means it: a relative local path is made absolute under the current directory
    here, on the driver, before it reaches a stage or a Ray worker (whose working directory is another one);
    URIs (s3://, file://, runs:/...) and absent flags stay as they are."""
    import re

    from mel_ray.pipeline import under

    if value is None or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value):
        return value
    return under(".", value)


def _report(result) -> int:
    """A stage's progress line, then its JSON summary (what jobs print too)."""
    print(result.line())
    print(json.dumps(result.summary(), default=str))
    return 0


def _name(cfg, given: str | None, output: str) -> str:
    """data.name: --name, else the config's when it sets one, else the output folder's name (as ingest and
    merge name a dataset themselves)."""
    from mel_ray.ingest import default_name

    if given:
        return given
    return cfg.data.name if "name" in cfg.data.model_fields_set else default_name(output)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from mel_ray import pipeline

    cfg = _config(args, **{"data.ingest.format": args.format, "data.ingest.input": args.input,
                           "data.dataset": args.output, "data.ingest.image_dir": args.image_dir,
                           "data.ingest.check_images": True if args.check_images else None,
                           "data.ingest.copy_images": False if args.reference_images else None})
    cfg.data.name = _name(cfg, args.name, args.output)
    result = pipeline.ingest_stage(cfg, root=".", force=True)     # an explicit ingest reads the release again
    print(result.note)           # ingest's one summary line (or "already ingested ...")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from mel_ray import pipeline

    cfg = _config(args, **{"data.merge": list(args.inputs), "data.dataset": args.output})
    cfg.data.name = _name(cfg, args.name, args.output)
    return _report(pipeline.merge_stage(cfg, root="."))


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
    from mel_ray import pipeline

    cfg = _config(args, **{"data.dataset": args.dataset, "negatives.k": args.k, "negatives.seed": args.seed,
                           "negatives.block_size": args.block_size, "negatives.source": args.source})
    return _report(pipeline.negatives_stage(cfg, root=".", num_workers=args.workers, force=args.force))


def _cmd_synthesize(args: argparse.Namespace) -> int:
    from mel_ray import pipeline

    cfg = _config(args, **{"data.dataset": args.dataset, "models.diffusion": args.model,
                           "synthesize.views": args.views})
    return _report(pipeline.synthesize_stage(cfg, root=".", limit=args.limit))


def _cmd_show_views(args: argparse.Namespace) -> int:
    from mel_ray.synthesize import show_views

    print(show_views(args.dataset, args.key, args.mention, args.output))
    return 0


def _cmd_extract_features(args: argparse.Namespace) -> int:
    from mel_ray import pipeline

    cfg = _config(args, **{"data.dataset": args.dataset, "models.clip": args.model, "synthesize.views": args.views})
    return _report(pipeline.features_stage(cfg, root=".", synthetic=args.synthetic,
                                           with_views=not args.no_synthetic, checkpoint=_here(args.checkpoint)))


def _cmd_train(args: argparse.Namespace) -> int:
    from mel_ray import pipeline

    cfg = _config(args, **{"data.dataset": args.dataset})
    return _report(pipeline.train_stage(cfg, root=".", features=_here(args.features), base=args.run_name,
                                        negatives=_here(args.negatives)))


def _cmd_tune(args: argparse.Namespace) -> int:
    from mel_ray import pipeline

    # flags are the caller's paths (the current directory); --root is where the config's relative paths live
    cfg = _config(args, **{"data.dataset": _here(args.dataset)})
    return _report(pipeline.tune_stage(cfg, root=args.root, features=_here(args.features)))


def _cmd_link(args: argparse.Namespace) -> int:
    from mel_ray import pipeline

    cfg = _config(args, **{f"link.{name}": getattr(args, name) for name in ("model", "kb", "mentions", "output",
                                                                             "top_k", "candidates")})
    return _report(pipeline.link_stage(cfg, root="."))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mel_ray.checkpoints import encoder_fingerprint_of, load_checkpoint
    from mel_ray.eval.evaluate import eval_settings, evaluate, format_table
    from mel_ray.train.run import find_features
    from mel_ray.verify import require_dataset, require_features

    cfg = _config(args, **{"eval.num_gpus": args.num_gpus})
    dataset, checkpoint, output = _here(args.dataset), _here(args.checkpoint), _here(args.output)
    if args.zero_shot and checkpoint:
        raise UsageError("evaluate: --zero-shot ranks with the encoder alone; leave out --checkpoint (or --zero-shot)")
    if not args.zero_shot and not checkpoint:
        raise UsageError("evaluate: give --checkpoint (a trained model) or --zero-shot (the encoder's own ranking)")
    if args.candidates is not None and args.candidates < 1:     # one line here; larger than the KB: evaluate's
        raise UsageError(f"evaluate: --candidates must be at least 1 (got {args.candidates})")
    require_dataset(dataset)             # on the driver, before any KB shard actor starts
    if args.zero_shot:                   # the base encoder's set (texts by models.text_encoder where one is named)
        features = find_features(dataset, _here(args.features), encoder=None,
                                 text_encoder_named=True if cfg.models.text_encoder else None)
    else:                                # the set made by the checkpoint's own encoder (base CLIP or fine-tuned)
        features = find_features(dataset, _here(args.features),
                                 encoder=encoder_fingerprint_of(load_checkpoint(checkpoint)))
    require_features(features, dataset)
    report = evaluate(dataset, features, checkpoint, args.split, output_uri=output, num_shards=args.shards,
                      entity_chunk=cfg.train.eval_entity_chunk, mention_batch=cfg.train.eval_mention_batch,
                      candidates=args.candidates, ranker="zero-shot" if args.zero_shot else "model",
                      **eval_settings(cfg.eval))
    print(format_table(report))
    print(f"same-name failures: {report['same_name_failures']['count']} of "
          f"{report['same_name_failures']['of_wrong_top1']} wrong top-1")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from mel_ray.dataset import load_dataset
    from mel_ray.verify import require_dataset

    require_dataset(args.dataset)        # a damaged dataset is one line and exit 2, never counts as if whole
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
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's, Train's, Tune's, Data's and the models' own output on the terminal, as it comes")
    parser.add_argument("--log-file", help="where that output goes otherwise (default: logs/<command>.log under "
                        "the demo's --output, pipeline's and tune's --root, else the current directory)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (configs/*.yaml); defaults follow the paper")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="everything on the terminal instead of the log file")
    common.add_argument("--log-file", default=argparse.SUPPRESS, help="the log file (see mel-ray --help)")
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
    p.add_argument("--entities", type=count(1), default=400)
    p.add_argument("--mentions", type=count(1), default=600)
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

    p = sub.add_parser("mine-negatives", parents=[common],
                       help="JD-CCL: exact top-k Jaccard (or name-similarity) hard negatives")
    p.add_argument("--dataset", help="default: data.dataset")
    p.add_argument("--source", choices=["jaccard", "names", "jaccard+names"],
                   help="rank by attribute Jaccard, name trigram TF-IDF cosine, or Jaccard with the names filling "
                   "the slots it leaves empty (default: negatives.source)")
    p.add_argument("--k", type=count(1), help="pool size k_max (default: negatives.k)")
    p.add_argument("--seed", type=count(0), help="tie-break seed (default: negatives.seed)")
    p.add_argument("--workers", type=count(0), help="Ray actors (default: one per CPU; 0 = no Ray)")
    p.add_argument("--block-size", type=count(1),
                   help="query entities per Ray Data block (default: negatives.block_size)")
    p.add_argument("--force", action="store_true", help="recompute even if the same pool is complete")
    p.set_defaults(func=_cmd_mine_negatives)

    p = sub.add_parser("synthesize", parents=[common], help="CVaCPT: draw synthetic views of every mention")
    p.add_argument("--dataset", help="default: data.dataset")
    p.add_argument("--model", help="diffusion model id or path (default: models.diffusion); 'procedural:demo' "
                   "is a TEST TOOL for generated demo data, not a model (see mel_ray/procedural.py)")
    p.add_argument("--views", type=count(1), help="n_s (default: synthesize.views)")
    p.add_argument("--limit", type=count(1), help="only the first N mentions of each split")
    p.set_defaults(func=_cmd_synthesize)

    p = sub.add_parser("show-views", parents=[common], help="a PNG grid of mentions and their synthetic views")
    p.add_argument("--dataset", required=True)
    p.add_argument("--key", help="synthetic/<key> (default: the only one)")
    p.add_argument("--mention", action="append", required=True, help="mention id (repeatable)")
    p.add_argument("--output", default="views.png")
    p.set_defaults(func=_cmd_show_views)

    p = sub.add_parser("extract-features", parents=[common], help="frozen CLIP features (MIMIC's inputs)")
    p.add_argument("--dataset", help="default: data.dataset")
    p.add_argument("--model", help="CLIP id or path (default: models.clip)")
    p.add_argument("--synthetic", help="synthetic/<KEY> whose views to encode (default: the key the config's "
                   "synthesize settings write, as jobs/extract_features.py does)")
    p.add_argument("--no-synthetic", action="store_true", help="entities and mentions only, no synthetic views")
    p.add_argument("--views", type=int, help="n_s: encode the first N views (default: synthesize.views)")
    p.add_argument("--checkpoint", help="a model trained with model.encoder=finetune (model.pt, checkpoint folder "
                   "or MLflow run): encode with its fine-tuned CLIP, so evaluate and link can use it")
    p.set_defaults(func=_cmd_extract_features)

    p = sub.add_parser("train", parents=[common], help="distributed JD-CCL + CVaCPT training on Ray Train")
    p.add_argument("--dataset", help="default: data.dataset")
    p.add_argument("--features", help="features/<key> URI (default: the only one)")
    p.add_argument("--negatives", help="a mined pool URI (default: the one negatives.k and negatives.source name)")
    p.add_argument("--run-name", default="train",
                   help="run name prefix: the run is <prefix>-<key of settings and inputs>; a finished one is skipped")
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
    p.add_argument("--top-k", dest="top_k", type=count(1), help="entities per mention (default 10)")
    p.add_argument("--candidates", type=int, help="APPROXIMATE: rerank only the top C of a dot-product first stage "
                   "(link.candidates; default: exact, every entity scored by the matcher)")
    p.set_defaults(func=_cmd_link)

    p = sub.add_parser("evaluate", parents=[common], help="exact full-KB ranking metrics")
    p.add_argument("--dataset", required=True)
    p.add_argument("--checkpoint", help="model.pt or a training checkpoint folder")
    p.add_argument("--zero-shot", dest="zero_shot", action="store_true", help="no trained model: rank by the cosine "
                   "of the features' global vectors (text, plus image where both have one): the encoder's floor")
    p.add_argument("--features", help="features/<key> URI (default: the only one)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--shards", type=count(1), default=2, help="KB shards (Ray actors)")
    p.add_argument("--num-gpus", dest="num_gpus", help="GPUs per KB shard: auto (default: 1 where the cluster has "
                   "GPUs) or a number (eval.num_gpus)")
    p.add_argument("--output", help="where to write predictions_<split>.parquet and eval_<split>.json")
    p.add_argument("--candidates", type=int, help="APPROXIMATE: rerank only the top C of a dot-product first stage "
                   "(default: exact)")
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
    from mel_ray import redact

    try:
        return func(argv) or 0
    except Exception as raised:
        # a DataError raised inside a Ray task, actor, Ray Data UDF or Train worker arrives wrapped by Ray (its
        # str() is a traceback): the original's one line is what is printed
        err = unwrap(raised, (StorageError,))
        if isinstance(err, (DataError, UsageError, StorageError)):
            if debug:
                traceback.print_exc()
            print(f"error: {redact.text(err)}", file=sys.stderr)
            return EXIT_DATA if isinstance(err, (DataError, UsageError)) else EXIT_STORAGE
        from mel_ray.tracking import describe_error

        line = describe_error(raised)   # MLflow / HTTP failures: one line without credentials, else re-raised
        if line is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {line}", file=sys.stderr)
        return EXIT_DATA if isinstance(line, UsageError) else EXIT_STORAGE


# commands that run Ray (or load models): their libraries' output goes to a log file unless --verbose
QUIET_COMMANDS = {"demo", "pipeline", "mine-negatives", "synthesize", "extract-features", "train", "tune", "link",
                  "evaluate"}


def log_file_for(args: argparse.Namespace) -> str | None:
    """--log-file, else logs/<command>.log under the command's folder (see --log-file's help); None: the
    command logs to stderr as it always did (it runs no Ray)."""
    from mel_ray.console import default_log_file

    if args.log_file:
        return args.log_file
    if args.command not in QUIET_COMMANDS:
        return None
    folder = args.output if args.command == "demo" else getattr(args, "root", ".")
    return str(default_log_file(folder, args.command))


def main(argv: list[str] | None = None) -> int:
    from mel_ray import console, redact

    with redact.redacted_output():   # no credential in anything this command prints (mel_ray/redact.py)
        parser = build_parser()
        args = parser.parse_args(argv)
        log_file = console.setup(log_file_for(args), verbose=args.verbose)
        redact.install_log_filter()
        if log_file is not None and args.command != "demo":      # the demo says it on its last lines
            print(f"mel-ray {args.command}: Ray's and the libraries' output -> {log_file} (--verbose: here)",
                  file=sys.stderr, flush=True)
        return run_guarded(lambda _argv: args.func(args), argv, debug=args.debug)

if __name__ == "__main__":
    sys.exit(main())
