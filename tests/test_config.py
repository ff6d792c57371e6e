"""Typed configuration: YAML files, clear errors, `--set a.b=c` overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from mel_ray.config import Config, load_config, parse_overrides
from mel_ray.errors import UsageError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.yaml")) + sorted(CONFIG_DIR.rglob("*.yml"))


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIG_FILES])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.name  # every config names its dataset


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.models.clip == "openai/clip-vit-base-patch32"
    assert cfg.features.text_length == 40 and cfg.model.hidden == 96
    assert cfg.train.lr == 1e-5 and cfg.train.batch_size == 128
    assert cfg.tracking.mlflow_uri is None


def test_file_values_and_empty_file(tmp_path):
    cfg = load_config(_yaml(tmp_path, "train:\n  lr: 1.0e-3\n  epochs: 2\ndata:\n  merge: [a, b]\n"))
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 2 and cfg.data.merge == ["a", "b"]
    assert load_config(_yaml(tmp_path, "")) == Config()


def test_unknown_key_lists_allowed_keys(tmp_path):
    path = _yaml(tmp_path, "train:\n  learning_rate: 0.1\n")
    with pytest.raises(UsageError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "unknown key 'train.learning_rate'" in message
    for allowed in ("lr", "batch_size", "epochs", "negatives", "use_gpu"):
        assert allowed in message.split("allowed here:")[1]


def test_unknown_section_and_nested_key(tmp_path):
    with pytest.raises(UsageError, match=r"unknown key 'trian' \(allowed here: data, eval, features, link, model"):
        load_config(_yaml(tmp_path, "trian:\n  lr: 1\n"))
    with pytest.raises(UsageError, match=r"unknown key 'data.ingest.fromat' \(allowed here: attr_kv_separator"):
        load_config(_yaml(tmp_path, "data:\n  ingest:\n    fromat: mimic\n"))


@pytest.mark.parametrize("text, key", [
    ("train:\n  epochs: many\n", "train.epochs"),
    ("train:\n  batch_size: 0\n", "train.batch_size"),              # bounds are checked too
    ("train:\n  negatives: random\n", "train.negatives"),           # Literal choices
    ("data:\n  ingest:\n    split_ratios: [0.5, 0.5, 0.5]\n", "data.ingest"),
    ("negatives:\n  k: [1, 2]\n", "negatives.k"),
    ("train: 3\n", "train"),
])
def test_wrong_types_fail_naming_the_key(tmp_path, text, key):
    path = _yaml(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_config(path)
    assert f"'{key}" in str(info.value) and str(path) in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(UsageError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UsageError, match="invalid YAML"):
        load_config(_yaml(tmp_path, "train: [\n"))
    with pytest.raises(UsageError, match="top level must be a mapping"):
        load_config(_yaml(tmp_path, "- a\n- b\n"))


BIG = "9" * 5000   # past Python's int-from-text limit (sys.get_int_max_str_digits(), 4300)


@pytest.mark.parametrize("text, line", [
    ("train:\n  lr: 1.0e-3\n  lr: 0.5\n", "invalid YAML at line 3 column 3: duplicate key 'lr' (first at line 2)"),
    ("train: {epochs: 2}\nmodel: {}\ntrain: {lr: 1}\n",
     "invalid YAML at line 3 column 1: duplicate key 'train' (first at line 1)"),
    ("tune:\n  k: [2, 4]\n  train: {epochs: 1, epochs: 2}\n",
     "invalid YAML at line 3 column 22: duplicate key 'epochs' (first at line 3)"),
    (f"train:\n  epochs: {BIG}\n", "invalid YAML at line 2 column 11: an integer of more than 4300 digits"),
    (f"tune:\n  k: [1, {BIG}]\n", "invalid YAML at line 2 column 10: an integer of more than 4300 digits"),
    ("train: " + "[" * 5000 + "]" * 5000 + "\n", "invalid YAML: nested too deeply"),
    ("train:\n  lr: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "invalid YAML: nested too deeply"),
])
def test_yaml_that_would_be_read_wrongly_or_crash_is_refused(tmp_path, text, line):
    path = _yaml(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {line}"


@pytest.mark.parametrize("item, message", [
    ("train={lr: 1, lr: 2}", ("--set train: value '{lr: 1, lr: 2}' is not valid YAML (duplicate key 'lr' (first "
                              "at line 1))")),
    (f"train.epochs={BIG}", "is not valid YAML (an integer of more than 4300 digits)"),
    ("train.lr=" + "[" * 5000 + "]" * 5000, "is not valid YAML (nested too deeply)"),
])
def test_set_values_are_held_to_the_same_rules(item, message):
    with pytest.raises(UsageError) as info:
        load_config(None, [item])
    assert message in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("item, key", [("train.lr=inf", "train.lr"), ("train.lr=.nan", "train.lr"),
                                       ("train.encoder_lr=.inf", "train.encoder_lr"),
                                       ("eval.cache_gb=-.inf", "eval.cache_gb"), ("tune.lr=[1e-3, .inf]", "tune.lr.1"),
                                       ("model.cvacpt_weight=.nan", "model.cvacpt_weight"),
                                       ("train.cpus_per_worker=1e999", "train.cpus_per_worker")])
def test_no_setting_takes_inf_or_nan(item, key):
    with pytest.raises(UsageError) as info:
        load_config(None, [item])
    assert str(info.value).startswith(f"<defaults>: '{key}': Input should be a finite number")


def test_set_overrides_are_typed(tmp_path):
    path = _yaml(tmp_path, "train:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["train.lr=0.5", "train.epochs=3", "train.use_gpu=true", "negatives.k=4",
                             "data.merge=[x, y]", "tracking.mlflow_uri=http://127.0.0.1:5000",
                             "data.ingest.split_ratios=[0.8, 0.1, 0.1]"])
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and cfg.train.use_gpu is True and cfg.negatives.k == 4
    assert cfg.data.merge == ["x", "y"]
    assert cfg.tracking.mlflow_uri == "http://127.0.0.1:5000"
    assert cfg.data.ingest.split_ratios == (0.8, 0.1, 0.1)
    assert load_config(None, ["tracking.mlflow_uri=null"]).tracking.mlflow_uri is None
    # "1e-4" is a string to YAML 1.1, but the float field still gets a float
    assert load_config(None, ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


def test_set_string_field_with_a_number_looking_value():
    """`--set data.name=2024` must give the string "2024", not fail because YAML read an int."""
    assert load_config(None, ["data.name=2024"]).data.name == "2024"
    assert load_config(None, ["tracking.experiment=1.5"]).tracking.experiment == "1.5"


def test_set_errors():
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        load_config(None, ["train.lr"])
    with pytest.raises(UsageError, match=r"unknown key 'train.lrr' \(allowed here:"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(UsageError, match="'train.epochs'"):
        load_config(None, ["train.epochs=lots"])
    with pytest.raises(UsageError, match="'lr' is not a section"):
        load_config(None, ["train.lr=1", "train.lr.x=2"])
    assert parse_overrides(["a.b=", "c=d=e"]) == [("a.b", ""), ("c", "d=e")]


def test_extends_reads_the_parent_first_and_overrides_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.5\n  epochs: 7\ntracking:\n  experiment: base\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "sweep.yaml").write_text("extends: ../base.yaml\ntrain:\n  epochs: 2\ntune:\n  k: [2]\n")
    cfg = load_config(tmp_path / "sub" / "sweep.yaml", ["tracking.experiment=x"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.tune.k, cfg.tracking.experiment) == (0.5, 2, [2], "x")


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UsageError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(UsageError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "c.yaml")
