"""The paper's recipe: the five paper configs carry it exactly, the README's override rows give the paper's other
rows, and the training loop builds MIMIC's AdamW (groups, betas, eps) and clips only when asked to."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

from mel_ray.cli import build_parser
from mel_ray.config import load_config
from mel_ray.errors import UsageError
from mel_ray.train.loop import clip_gradients, decay_groups, make_optimizer, worker_batch_size

ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = ["wikimel", "richpediamel", "wikidiverse", "wikidm", "wikidr"]
README_SECTION = "## Paper rows from one config"

# MIMIC's recipe (lr, AdamW, batch, schedule, seed) + JD-CCL / CVaCPT with the paper's Table 2 best k and n_s
RECIPE = {
    "train.negatives": "jaccard", "train.k": 6, "train.lr": 1e-5, "train.adam_betas": (0.9, 0.999),
    "train.adam_eps": 1e-4, "train.weight_decay": 1e-4, "train.grad_clip": None, "train.batch_size": 128,
    "train.epochs": 20, "train.eval_every": 2, "train.patience": 3, "train.seed": 43,
    "model.views": 3, "synthesize.views": 3, "model.cvacpt_weight": 1.0,
}

# what each README row must change (and nothing else): row label -> {dotted key: value}
ROWS = {
    "JD-CCL + CVaCPT": {},
    "MIMIC": {"train.negatives": "in_batch", "model.cvacpt_weight": 0.0},
    "w/o JD-CCL": {"train.negatives": "in_batch"},
    "w/o CVaCPT": {"model.cvacpt_weight": 0.0},
}


def value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, val in tree.items():
        if isinstance(val, dict) and val:
            out.update(flat(val, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = val
    return out


# ------------------------------------------------------------------------------------------- the configs


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_carries_the_recipe(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    for dotted, expected in RECIPE.items():
        got = value(cfg, dotted)
        assert got == expected and type(got) is type(expected), (name, dotted, got)
    assert cfg.negatives.k >= cfg.train.k            # the mined pool holds the k negatives a step samples
    assert cfg.train.batch_size % cfg.train.num_workers == 0


def test_every_recipe_line_cites_its_source():
    for name in PAPER_CONFIGS:
        lines = (ROOT / "configs" / f"{name}.yaml").read_text().splitlines()
        for dotted in RECIPE:
            section, key = dotted.split(".")
            start = lines.index(f"{section}:")
            line = next(x for x in lines[start + 1:] if x.lstrip().startswith(f"{key}:"))
            assert re.search(r"#.*(\[M\]|\[P\]|our choice)", line), (name, line)


def test_table2_sweep_keeps_the_recipe():
    cfg = load_config(ROOT / "configs" / "tune" / "wikidiverse.yaml")
    for dotted, expected in RECIPE.items():
        assert value(cfg, dotted) == expected, dotted
    assert cfg.tune.seeds == [43] and cfg.tune.k == [2, 4, 6] and cfg.tune.views == [1, 2, 3]
    assert cfg.negatives.k >= max(cfg.tune.k) and cfg.synthesize.views >= max(cfg.tune.views)


def test_new_train_keys_validate_and_parse_from_set():
    cfg = load_config(None, ["train.grad_clip=null", "train.adam_betas=[0.8, 0.99]", "train.adam_eps=1e-6"])
    assert cfg.train.grad_clip is None and cfg.train.adam_betas == (0.8, 0.99) and cfg.train.adam_eps == 1e-6
    defaults = load_config()
    assert (defaults.train.grad_clip, defaults.train.adam_betas, defaults.train.adam_eps) == (1.0, (0.9, 0.999),
                                                                                              1e-8)
    for bad in ["train.adam_betas=[0.9, 1.0]", "train.adam_betas=[-0.1, 0.9]", "train.adam_betas=[0.9]",
                "train.adam_betas=[true, 0.9]", "train.adam_eps=0", "train.adam_eps=.inf", "train.grad_clip=0",
                "train.grad_clip=.nan"]:
        with pytest.raises(UsageError, match=re.escape(f"'{bad.split('=')[0]}")):
            load_config(None, [bad])
    with pytest.raises(UsageError, match=r"betas must both be in \[0, 1\)"):
        load_config(None, ["train.adam_betas=[0.9, 1.0]"])


def test_batch_size_is_the_global_batch():
    assert worker_batch_size(128, 1) == 128 and worker_batch_size(128, 2) == 64 and worker_batch_size(128, 8) == 16
    with pytest.raises(ValueError, match="does not split evenly"):
        worker_batch_size(128, 3)
    with pytest.raises(UsageError, match="must split evenly over num_workers 3"):
        load_config(ROOT / "configs" / "wikimel.yaml", ["train.num_workers=3"])
    assert load_config(ROOT / "configs" / "wikimel.yaml", ["train.num_workers=4"]).train.batch_size == 128


# ------------------------------------------------------------------------------------ the README's rows


def readme_rows() -> dict[str, list[str]]:
    """{paper row label: its --set values} from the README table of the section."""
    text = (ROOT / "README.md").read_text()
    assert README_SECTION in text
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or cells[0] in ("paper row", "---"):
            continue
        overrides = cells[1].strip("`")
        tokens = [] if overrides == "(none)" else shlex.split(overrides)
        assert tokens[::2] == ["--set"] * (len(tokens) // 2) and len(tokens) % 2 == 0, line
        rows[cells[0]] = tokens[1::2]
    return rows


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text().split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_the_four_paper_rows():
    labels = list(readme_rows())
    assert len(labels) == len(ROWS)
    for label, key in zip(labels, ROWS):
        assert label.startswith(key), (label, key)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_readme_rows_give_the_intended_config(name):
    path = ROOT / "configs" / f"{name}.yaml"
    base = flat(load_config(path).model_dump())
    for label, sets in readme_rows().items():
        changes = next(c for key, c in ROWS.items() if label.startswith(key))
        row = flat(load_config(path, sets).model_dump())
        changed = {k: v for k, v in row.items() if base[k] != v}
        assert changed == changes, (label, changed)
        # the CLI takes them as written: repeated --set, in order
        args = build_parser().parse_args(["pipeline", "--config", str(path), *[t for s in sets for t in ("--set", s)]])
        assert args.set == sets


def test_readme_commands_are_rows_of_the_table():
    rows = [sorted(sets) for sets in readme_rows().values()]
    commands = readme_commands()
    assert commands
    for argv in commands:
        assert argv[:2] == ["python", "jobs/pipeline.py"] and argv[2] == "--config", argv
        config, tokens = argv[3], argv[4:]
        assert tokens[::2] == ["--set"] * (len(tokens) // 2), argv
        assert sorted(tokens[1::2]) in rows, argv
        assert (ROOT / config).is_file() and load_config(ROOT / config, tokens[1::2])


# ------------------------------------------------------------------------------------------- optimizer


class Odd(nn.Module):
    """Every kind of parameter a rule by name or by rank would get wrong."""

    def __init__(self):
        super().__init__()
        self.ln_in = nn.LayerNorm((4, 8))                 # a LayerNorm whose name says nothing and whose weight is 2-D
        self.proj = nn.Linear(8, 8)
        self.conv = nn.Conv1d(4, 4, 3)
        self.embed = nn.Embedding(10, 8)
        self.group = nn.GroupNorm(2, 4)
        self.gate = nn.Parameter(torch.ones(8))          # a 1-D weight that is neither a bias nor a norm's
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def groups_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"] for g in optimizer.param_groups}
    assert len(optimizer.param_groups) == 2 and 0.0 in decay
    out = {}
    for group in optimizer.param_groups:
        out[group["weight_decay"] > 0] = {names[id(p)] for p in group["params"]}
    return out[True], out[False]


def test_decay_groups_by_module_type():
    model = Odd()
    optimizer = make_optimizer(model, load_config(ROOT / "configs" / "wikimel.yaml").train.model_dump())
    decay, no_decay = groups_of(model, optimizer)
    assert no_decay == {"ln_in.weight", "ln_in.bias", "proj.bias", "conv.bias", "group.weight", "group.bias"}
    assert decay == {"proj.weight", "conv.weight", "embed.weight", "gate"}      # frozen: in no group


def test_mel_model_optimizer_is_mimics_adamw():
    from mel_ray.model import MELModel, ModelDims

    model = MELModel(ModelDims(text_global=16, text_local=16, image_global=16, image_local=24, hidden=8))
    cfg = load_config(ROOT / "configs" / "wikimel.yaml").train.model_dump()
    optimizer = make_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert group["lr"] == 1e-5 and group["eps"] == 1e-4 and tuple(group["betas"]) == (0.9, 0.999)
    decay, no_decay = groups_of(model, optimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    assert {g["weight_decay"] for g in optimizer.param_groups} == {1e-4, 0.0}
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms, "MELModel has LayerNorms (MIMIC's input and unit LayerNorms)"
    expected = {f"{prefix}.{n}" for prefix, m in model.named_modules() if isinstance(m, nn.LayerNorm)
                for n, _ in m.named_parameters(recurse=False)}
    expected |= {n for n in trainable if n.endswith(".bias")}
    assert no_decay == expected


def test_decay_groups_weight_decay_value():
    groups = decay_groups(nn.Linear(3, 3), 0.5)
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.5, 1), (0.0, 1)]


# ------------------------------------------------------------------------------------------- clipping


def huge_gradients() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 1))
    (model(torch.randn(4, 6)).sum() * 1e6).backward()
    return model


def test_grad_clip_none_leaves_the_gradients_exactly_as_they_are():
    model = huge_gradients()
    before = [p.grad.clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in before]))
    assert expected > 1e3
    norm = clip_gradients(model.parameters(), None)
    assert torch.isclose(norm, expected)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


def test_grad_clip_value_clips_to_the_norm():
    model = huge_gradients()
    norm = clip_gradients(model.parameters(), 1.0)
    assert norm > 1e3
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert after == pytest.approx(1.0, rel=1e-4)


def test_grad_clip_none_still_reports_a_non_finite_norm():
    model = huge_gradients()
    next(model.parameters()).grad[0, 0] = float("nan")
    assert not torch.isfinite(clip_gradients(model.parameters(), None))
    model = nn.Linear(2, 2)                               # no gradients at all: a norm of 0, no error
    assert float(clip_gradients(model.parameters(), None)) == 0.0
