"""The package's dependency rules, read from the source with `ast` (nothing is imported):

* train and eval never import each other; both (and tune and link) read features through mel_ray.feature_store,
  score through mel_ray.scoring and load models through mel_ray.checkpoints, which import none of them;
* no module imports another module's underscored names (or reaches into them as `module._name`).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mel_ray"
SHARED = ("mel_ray.feature_store", "mel_ray.scoring", "mel_ray.checkpoints")
CONSUMERS = ("mel_ray.train", "mel_ray.eval", "mel_ray.tune", "mel_ray.link", "mel_ray.pipeline", "mel_ray.cli")


@functools.cache
def _source() -> dict[str, tuple[ast.Module, bool]]:
    """module name -> (its syntax tree, whether it is a package's __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_init else parts)] = (ast.parse(path.read_text(), str(path)), is_init)
    return out


def _parse(code: dict[str, str]) -> dict[str, tuple[ast.Module, bool]]:
    return {name: (ast.parse(text), False) for name, text in code.items()}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _imports(name: str, tree: ast.Module, is_init: bool) -> list[tuple[str, list[tuple[str, str]], int]]:
    """(module, [(name taken, local name)], line) for every import of the module, also those inside functions."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".")[:len(name.split(".")) - node.level + is_init]
                module = ".".join(base + ([module] if module else []))
            out.append((module, [(a.name, a.asname or a.name) for a in node.names], node.lineno))
    return out


def train_eval_violations(modules: dict) -> list[str]:
    bad = []
    for name, (tree, is_init) in modules.items():
        for module, names, line in _imports(name, tree, is_init):
            targets = [module] + [f"{module}.{n}" for n, _ in names]
            for a, b in (("mel_ray.train", "mel_ray.eval"), ("mel_ray.eval", "mel_ray.train")):
                if _under(name, a) and any(_under(t, b) for t in targets):
                    bad.append(f"{name}:{line} imports {module}")
    return bad


def layering_violations(modules: dict) -> list[str]:
    bad = []
    for name, (tree, is_init) in modules.items():
        if any(_under(name, s) for s in SHARED):
            for module, names, line in _imports(name, tree, is_init):
                targets = [module] + [f"{module}.{n}" for n, _ in names]
                if any(_under(t, c) for t in targets for c in CONSUMERS):
                    bad.append(f"{name}:{line} imports {module}")
    return bad


def private_name_violations(modules: dict) -> list[str]:
    def private(n: str) -> bool:
        return n.startswith("_") and not n.startswith("__")

    bad = []
    for name, (tree, is_init) in modules.items():
        bound: dict[str, str] = {}          # local name -> the mel_ray module it stands for
        for module, names, line in _imports(name, tree, is_init):
            if not _under(module, "mel_ray"):
                continue
            if not names:
                bound[module.split(".")[0]] = module.split(".")[0]
            for taken, local in names:
                if f"{module}.{taken}" in modules:
                    bound[local] = f"{module}.{taken}"
                elif private(taken) and module != name:
                    bad.append(f"{name}:{line} imports {module}.{taken}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _under(a.name, "mel_ray") and a.asname:
                        bound[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and private(node.attr) \
                    and node.value.id in bound and bound[node.value.id] != name:
                bad.append(f"{name}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    return bad


def test_train_and_eval_do_not_import_each_other():
    assert train_eval_violations(_source()) == []


def test_feature_store_scoring_and_checkpoints_depend_on_no_stage_that_uses_them():
    assert layering_violations(_source()) == []


def test_no_module_takes_another_modules_private_names():
    assert private_name_violations(_source()) == []


def test_the_checks_see_violations():
    modules = _parse({
        "mel_ray.eval.evaluate": "from mel_ray.train.loop import dev_statistics\n",
        "mel_ray.train.loop": "def f():\n    from mel_ray.eval import evaluate\n",
        "mel_ray.features.inputs": "def _note(): pass\n",
        "mel_ray.link": "from mel_ray.features.inputs import _note\nimport mel_ray.features.inputs as i\ni._note()\n",
        "mel_ray.scoring": "from mel_ray.train.loop import f\n",
    })
    assert train_eval_violations(modules) == ["mel_ray.eval.evaluate:1 imports mel_ray.train.loop",
                                              "mel_ray.train.loop:2 imports mel_ray.eval"]
    assert layering_violations(modules) == ["mel_ray.scoring:1 imports mel_ray.train.loop"]
    assert private_name_violations(modules) == ["mel_ray.link:1 imports mel_ray.features.inputs._note",
                                                "mel_ray.link:3 uses mel_ray.features.inputs._note"]
