"""Typed configuration: YAML files in configs/, validated by pydantic, overridden with `--set a.b=c`.

Defaults follow the paper (§5.4) and MIMIC: CLIP ViT-B/32, text length 40, hidden size 96, lr 1e-5,
batch 128. Secrets (S3 keys, tokens) never belong here: they come from the environment.
"""

from __future__ import annotations

import functools
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mel_ray import redact
from mel_ray.errors import UsageError

MAX_EXCERPT = 200   # characters of an offending value shown in an error (a YAML alias bomb is gigabytes)


@functools.cache
def _leaf_types(annotation: Any) -> frozenset:
    """The plain types inside an annotation: `list[int] | None` -> {list, int, NoneType}."""
    out: set = set()
    stack = [annotation]
    while stack:
        a = stack.pop()
        args = typing.get_args(a)
        origin = typing.get_origin(a)
        if origin is Annotated:
            stack.append(args[0])
            continue
        if origin is Literal:
            out.update(type(x) for x in args)
            continue
        if args:
            stack.extend(args)
        if isinstance(origin, type):
            out.add(origin)
        elif isinstance(a, type):
            out.add(a)
    return frozenset(out)


def _has_bool(value: Any, depth: int = 0) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, (list, tuple)) and depth < 2:
        return any(_has_bool(v, depth + 1) for v in value[:1000])
    return False


# GPUs per actor of a stage's actor pool: "auto" = 1 where the Ray cluster has GPUs (or may get them,
# MEL_RAY_AUTOSCALING=1), else 0 (CPU); a number is used as given and fails fast if the cluster cannot place it
# (mel_ray.runtime.resolve_num_gpus)
def _num_gpus(value: Any) -> float | str:
    if value == "auto":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if isinstance(value, bool) or not number >= 0:
        raise ValueError("expected 'auto' or a number of GPUs per actor >= 0")
    return number


NumGpus = Annotated[float | Literal["auto"], PlainValidator(_num_gpus)]


class Section(BaseModel):
    # allow_inf_nan=False: no setting means anything at inf or NaN (train.lr=inf would diverge on step one)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML `true` is not the integer 1: a boolean where a number is expected is refused."""
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _has_bool(value):
            leaves = _leaf_types(field.annotation)
            if bool not in leaves and (int in leaves or float in leaves):
                raise ValueError("expected a number, got a boolean")
        return value


class IngestConfig(Section):
    format: Literal["mimic", "melbench", "jsonl"] = "mimic"
    input: str | None = None
    image_dir: str | None = None           # melbench only: folder of mention images
    copy_images: bool = True               # copy images into DATASET/images (default) or reference them
    check_images: bool = False             # decode every image; corrupt ones are counted and dropped
    attr_separator: str = "."              # mimic `attr`: statements end with this separator ...
    attr_kv_separator: str = ":"           # ... and are "property: value" pairs
    split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)   # melbench: train/dev/test by hash

    @model_validator(mode="after")
    def _ratios(self) -> IngestConfig:
        if any(r < 0 for r in self.split_ratios) or abs(sum(self.split_ratios) - 1.0) > 1e-6:
            raise ValueError("split_ratios must be three non-negative numbers summing to 1")
        return self


class DataConfig(Section):
    name: str = "dataset"
    dataset: str = "data/dataset"          # URI of the canonical dataset (local path or s3://)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    merge: list[str] = Field(default_factory=list)   # datasets to merge into `dataset` (WikiDM / WikiDR)


class ModelsConfig(Section):
    clip: str = "openai/clip-vit-base-patch32"
    diffusion: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    cache_dir: str = "~/.cache/mel-ray/models"       # where s3:// model folders are fetched to
    # the text encoder: None = CLIP's text tower (models.clip); else a BERT-family model id, local or s3:// folder
    # (AutoModel + AutoTokenizer; paper Sec. 4.1 names BERT): t_G = its [CLS] state, T_L = its token states;
    # images stay CLIP's. Frozen features and model.encoder=finetune (where it trains, at train.encoder_lr) alike
    text_encoder: str | None = None
    # how the text encoder's final states become t_G: "cls" = the [CLS] state (BERT, as MIMIC and the paper),
    # "mean" = their attention-mask-weighted mean (what sentence-transformers models such as all-MiniLM-L6-v2 were
    # trained to give), "auto" = what the folder's sentence-transformers Pooling module declares, else cls.
    # Only with models.text_encoder (CLIP's text tower has its own pooled state); in the features key when not cls
    text_pooling: Literal["auto", "cls", "mean"] = "auto"


class NegativesConfig(Section):
    k: int = Field(16, ge=1)                # pool size k_max; training samples its k from it
    seed: int = Field(0, ge=0)
    block_size: int = Field(4096, ge=1)
    # what the mined pool ranks KB entities by (train.negatives=jaccard/both sample from it, whatever its source):
    # "jaccard" = JD-CCL, attribute sets (negatives/k{K}); "names" = cosine of character-trigram TF-IDF of the
    # names, for KBs without attributes (negatives/names_k{K}); "jaccard+names" = the Jaccard pool, each entity's
    # remaining slots up to k filled from its name ranking, counted per reason (negatives/jaccard_names_k{K})
    source: Literal["jaccard", "names", "jaccard+names"] = "jaccard"


class SynthesizeConfig(Section):
    views: int = Field(3, ge=1)             # n_s
    template: str = "An image of {mention}: {sentence}"
    steps: int = Field(25, ge=1)
    guidance: float = Field(7.5, ge=0)
    size: int = Field(512, ge=8)
    scheduler: str = "dpmsolver++"
    seed: int = Field(0, ge=0)
    batch_size: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)
    num_gpus: NumGpus = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None   # None: float16 on GPU, float32 on CPU
    safety_checker: bool = False            # the model's NSFW checker (it blacks out flagged views)


class FeaturesConfig(Section):
    text_length: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=1)
    concurrency: int = Field(1, ge=1)
    num_gpus: NumGpus = "auto"


class ModelConfig(Section):
    hidden: int = Field(96, ge=1)           # h: MIMIC's matcher size (every unit; v_G and V_L are projected to it)
    cvacpt_weight: float = Field(1.0, ge=0.0, le=1.0)   # w in feature + w * (alpha * feature + beta)
    views: int | None = Field(None, ge=0)   # n_s: synthetic views CVaCPT uses (None: all the features hold)
    # A^G / A^L output layers: "random" (PyTorch's default init) or "identity" (zero, so CVaCPT starts as the
    # identity and learns a residual modulation); the paper does not say (docs/experiments.md compares both)
    cvacpt_init: Literal["random", "identity"] = "random"
    # the encoding layer: "frozen" reads cached CLIP features (extract-features; fast sweeps), "finetune" trains
    # CLIP's towers with the matcher on pixels and token ids (paper Sec. 4.1, MIMIC; train.encoder_lr)
    encoder: Literal["frozen", "finetune"] = "frozen"


class TrainConfig(Section):
    lr: float = Field(1e-5, gt=0)
    encoder_lr: float = Field(1e-5, gt=0)   # model.encoder=finetune: CLIP's own rate (MIMIC 1e-5); lr is the heads'
    batch_size: int = Field(128, ge=1)     # the global batch: each of num_workers workers takes an equal share
    epochs: int = Field(20, ge=1)
    k: int = Field(6, ge=0)                 # hard negatives per positive, sampled from the mined pool
    negatives: Literal["jaccard", "in_batch", "both"] = "both"
    eval_every: int = Field(1, ge=1)
    patience: int = Field(5, ge=1)
    sample_top: int | None = Field(None, ge=1)   # None: the pool's top-k; else k at random from its top-N
    weight_decay: float = Field(0.01, ge=0)      # AdamW; never on biases or normalisation layers (loop.decay_groups)
    adam_betas: tuple[float, float] = (0.9, 0.999)                   # AdamW betas, each in [0, 1)
    adam_eps: float = Field(1e-8, gt=0, allow_inf_nan=False)         # AdamW eps (PyTorch's; MIMIC: 1e-4)
    grad_clip: float | None = Field(1.0, gt=0, allow_inf_nan=False)  # max gradient norm; null: no clipping
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)   # leave CPUs to Ray Data's readers: they feed the workers
    max_failures: int = Field(2, ge=0)          # worker failures survived by restarting from the last checkpoint
    keep_checkpoints: int = Field(2, ge=1)       # best by dev MRR are kept (the latest always is)
    eval_mention_batch: int = Field(64, ge=1)
    eval_entity_chunk: int = Field(1024, ge=1)
    shuffle_buffer: int = Field(1024, ge=1)
    torch_threads: int = Field(1, ge=1)          # per CPU worker; more threads than cores only slows DDP down
    seed: int = Field(0, ge=0)

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError("AdamW betas must both be in [0, 1), e.g. [0.9, 0.999]")
        return betas

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is the global batch and must split evenly over "
                             f"num_workers {self.num_workers} (e.g. batch_size "
                             f"{self.batch_size // self.num_workers * self.num_workers or self.num_workers})")
        return self


class SweepConfig(Section):
    """`mel-ray tune`: the paper's Table 2 grid (k x n_s), optionally lr, w and seeds."""

    name: str = "sweep"
    k: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [2, 4, 6])
    views: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [1, 2, 3])
    lr: list[Annotated[float, Field(gt=0)]] = Field(default_factory=list)                    # empty: train.lr
    cvacpt_weight: list[Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=list)   # empty: model.*
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)                   # empty: train.seed
    scheduler: Literal["fifo", "asha"] = "fifo"
    # the trials' model.encoder: "frozen" (default: every trial reads one feature set, fast) or "finetune"
    # (each trial trains CLIP too and writes its own features; the sweep's feature set then gives the views)
    encoder: Literal["frozen", "finetune"] = "frozen"
    asha_grace_period: int = Field(1, ge=1)                   # epochs before ASHA may stop a trial
    max_concurrent_trials: int = Field(1, ge=1)
    # the trial's driver, idle while its Ray Train workers (which ask for train.* resources) run
    trial_cpus: float = Field(0.05, gt=0)
    evaluate_test: bool = True               # exact test evaluation of every trial (the table has dev and test)
    # train.* values for every trial (shorter epochs, the trial's workers and CPUs, ...), over the train section
    train: dict[str, Any] = Field(default_factory=dict)
    # the arm (a grid point without its seed) every other arm is compared with over tune.seeds (paired t-test in
    # ablation.md), by its swept values, e.g. {k: 4, views: 3}; an axis with one value may be left out.
    # None: the grid's first arm
    baseline: dict[str, int | float] | None = None

    @model_validator(mode="after")
    def _non_empty(self) -> SweepConfig:
        if not self.k or not self.views:
            raise ValueError("tune.k and tune.views need at least one value each")
        unknown = sorted(set(self.train) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"tune.train: unknown train keys {unknown} (allowed: {sorted(TrainConfig.model_fields)})")
        if self.baseline is not None:
            import itertools

            from mel_ray.tune.stats import arm_label, find_arm

            axes = {"k": self.k, "views": self.views, "lr": self.lr, "cvacpt_weight": self.cvacpt_weight}
            swept = {name: values for name, values in axes.items() if values}
            other = sorted(set(self.baseline) - set(swept))
            if not self.baseline or other:
                raise ValueError(f"tune.baseline {self.baseline}: name the baseline arm by its swept values, keys "
                                 f"among {sorted(swept)}{f' (not {other})' if other else ''}, e.g. "
                                 f"{{k: {self.k[0]}, views: {self.views[0]}}}")
            arms = [{"arm": arm, "name": arm_label(arm)}
                    for arm in (dict(zip(swept, point)) for point in itertools.product(*swept.values()))]
            find_arm(arms, self.baseline)
        return self


class LinkConfig(Section):
    """`mel-ray link` / jobs/link.py: new mentions against a KB with a trained model."""

    model: str | None = None                # model.pt, an MLflow run id (runs:/<id>) or a checkpoint folder
    kb: str | None = None                   # a mel-ray dataset with features made with the model's CLIP
    mentions: str | None = None             # .parquet or .jsonl: text, mention, optional image, mention_id
    output: str = "links"
    top_k: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)       # mentions per encoder / scorer call
    entity_chunk: int = Field(1024, ge=1)   # KB entities scored at once (memory: batch x chunk)
    concurrency: int = Field(1, ge=1)       # actors per stage (diffusion, CLIP, scorer)
    use_gpu: bool = False
    # None: exact (every KB entity scored by the matcher); C: retrieve the top C by the matcher's dot-product
    # parts, rerank them with the full matcher (approximate; mel_ray/eval/candidates.py)
    candidates: int | None = Field(None, ge=1)


class EvalConfig(Section):
    """Full-KB scoring: `mel-ray evaluate`, a run's test evaluation, Tune trials' test evaluation and link's
    scorer (the dev evaluation inside training runs on the training workers' own devices, train.use_gpu)."""

    num_gpus: NumGpus = "auto"              # per KB shard / scorer actor; scores stay fp32 (the tie policy is exact)
    cache_gb: float = Field(1.0, ge=0)      # per KB shard or link scorer: entity sides kept across batches; 0: off
    in_flight: int = Field(2, ge=1)         # mention batches queued at each shard (no global wait per batch)
    batch_size: int = Field(256, ge=1)      # mentions per shard call


class TrackingConfig(Section):
    mlflow_uri: str | None = None           # None: MLFLOW_TRACKING_URI, else the embedded sqlite store
    experiment: str = "mel-ray"
    storage: str = "runs"                   # Ray Train storage_path / artifact root (local path or s3://)


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: SweepConfig = Field(default_factory=SweepConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at a nested location, for the error message."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return sorted(model.model_fields)
        model = annotation
    return sorted(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(Config, loc[:-1]))
            lines.append(f"{source}: unknown key '{dotted}' (allowed here: {allowed})")
        else:
            lines.append(f"{source}: '{dotted}': {e['msg']} (got {redact.excerpt(e.get('input'), MAX_EXCERPT)})")
    return "\n".join(lines)


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses what it would otherwise accept silently or crash on: a key given twice in one
    mapping (YAML keeps the last, so the first value is dropped without a word) and an integer longer than
    Python converts from text (sys.get_int_max_str_digits(): a ValueError, not a YAML error)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {redact.excerpt(key, 80)} (first at line {seen[key].line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of more than {sys.get_int_max_str_digits()} digits", node.start_mark) from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """`text` as YAML with _StrictLoader's refusals; RecursionError (thousands of nested brackets) is a YAMLError."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UsageError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise UsageError(f"--set {redact.excerpt(item, MAX_EXCERPT)}: expected KEY=VALUE with a dotted key, "
                             "e.g. --set train.lr=1e-4")
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err) or type(err).__name__
            hint = ("" if isinstance(err, yaml.constructor.ConstructorError) or problem == "nested too deeply" else
                    "; quote it, e.g. --set 'tracking.experiment=\"a: b\"'")
            raise UsageError(f"--set {key}: value {redact.excerpt(raw, MAX_EXCERPT)} is not valid YAML "
                             f"({problem}){hint}") from None
        parsed.append((key, value))
    return parsed


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """One YAML file as a tree; `extends: OTHER.yaml` (relative to this file) is read first and this file's
    values override it, section by section (so configs/tune/wikimel.yaml is configs/wikimel.yaml + a sweep)."""
    if path.resolve() in seen:
        raise UsageError(f"{path}: 'extends' loops back to itself ({' -> '.join(map(str, seen))})")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: cannot read config: {err.strerror or err}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UsageError(f"{path}: config is not valid UTF-8: byte 0x{data[err.start]:02x} at line {line}") from None
    try:
        tree = load_yaml(text) or {}
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        if mark is not None and problem:
            raise UsageError(f"{path}: invalid YAML at line {mark.line + 1} column {mark.column + 1}: "
                             f"{' '.join(problem.split())}") from None
        raise UsageError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(tree, dict):
        raise UsageError(f"{path}: top level must be a mapping of sections")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise UsageError(f"{path}: 'extends' must be a path to another config (got {parent!r})")
    return _deep_merge(_read_tree(path.parent / parent, (*seen, path.resolve())), tree)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults), apply `a.b=c` overrides, validate; errors name the file and key."""
    source = str(path) if path else "<defaults>"
    tree = _read_tree(Path(path)) if path is not None else {}
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UsageError(_format_errors(err, source)) from None
    except RecursionError:
        raise UsageError(f"{source}: a value is nested too deeply") from None
