"""cluster/ and docs/cluster.md, checked statically (no cluster, no Ray instance):

every `jobs/<name>.py` they name exists and starts (`--help`), every `configs/...yaml` loads, with the `--set`
overrides given next to it; the image's Ray is the installed one; the launcher config passes Ray's own
validation and the runtime envs Ray's RuntimeEnv; token authentication is on wherever it is set and never
switched off; no credential is written down. The checks are functions of a repository root, so the last test
runs them on broken copies and proves they fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from mel_ray.config import load_config
from mel_ray.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ("cluster/Dockerfile", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
            "cluster/launcher.yaml", "cluster/runtime_env.yaml")
JOB_RE = re.compile(r"\bjobs/[a-z_]+\.py\b")
CONFIG_RE = re.compile(r"\bconfigs/[\w/.-]+?\.yaml\b")
# `--config PATH` followed by any number of `--set KEY=VALUE` (shell continuations are joined first)
COMMAND_RE = re.compile(r"--config[= ]\s*([\w./-]+\.yaml)((?:\s+--set[= ]\s*\S+)*)")
SET_RE = re.compile(r"--set[= ]\s*(\S+)")
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
SECRET_VALUE = re.compile(r"(?i)(?:secret_access_key|session_token|auth_token|password)[\"']?\s*[:=]\s*[\"']?"
                          r"[A-Za-z0-9/+=]{20,}")


# ----------------------------------------------------------------------------------------------- reading


def cluster_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "cluster").rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def yaml_files(root: Path) -> list[Path]:
    return [p for p in cluster_files(root) if p.suffix in (".yaml", ".yml")]


def named_in(root: Path) -> list[Path]:
    return [*cluster_files(root), root / "docs" / "cluster.md"]


def load_yaml(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def strings(node) -> list[str]:
    """Every string value of a parsed YAML tree (folded entrypoints, embedded runtimeEnvYAML, ...)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return []


def command_texts(path: Path) -> list[str]:
    """The file's text with shell continuations joined (also inside YAML comments), plus its YAML strings."""
    texts = [re.sub(r"\\\n[ \t]*#?[ \t]*", " ", path.read_text())]
    if path.suffix in (".yaml", ".yml"):
        texts += [s for doc in load_yaml(path) for s in strings(doc)]
    return texts


def repo_path(path: str) -> str:
    """`/home/ray/mel-ray/configs/x.yaml` (a path inside the image) -> `configs/x.yaml`."""
    for top in ("configs/", "jobs/"):
        if top in path:
            return top + path.split(top, 1)[1]
    return path


def named_jobs(root: Path) -> list[str]:
    return sorted({m for p in named_in(root) for m in JOB_RE.findall(p.read_text())})


def named_configs(root: Path) -> list[str]:
    return sorted({m for p in named_in(root) for m in CONFIG_RE.findall(p.read_text())})


def commands(root: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(file, config, overrides) for every `--config X [--set K=V ...]` written in cluster/ or the doc."""
    found = set()
    for path in named_in(root):
        for text in command_texts(path):
            for m in COMMAND_RE.finditer(text):
                sets = tuple(v.strip("`'\"") for v in SET_RE.findall(m.group(2)))
                found.add((path.relative_to(root).as_posix(), repo_path(m.group(1)), sets))
    return sorted(found)


def kube_clusters(root: Path) -> list[tuple[str, dict]]:
    """(file, RayClusterSpec) of every KubeRay manifest under cluster/."""
    specs = []
    for path in yaml_files(root):
        for doc in load_yaml(path):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "RayCluster":
                specs.append((path.name, doc["spec"]))
            elif doc.get("kind") == "RayJob" and "rayClusterSpec" in doc["spec"]:
                specs.append((path.name, doc["spec"]["rayClusterSpec"]))
    return specs


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def dockerfile(root: Path) -> str:
    return (root / "cluster" / "Dockerfile").read_text()


# ------------------------------------------------------------------------------------------------ checks


def check_job(root: Path, job: str) -> None:
    assert (root / job).is_file(), f"{job} is named in cluster/ or docs/cluster.md but does not exist"
    run = subprocess.run([sys.executable, job, "--help"], cwd=root, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0 and "--config" in run.stdout, f"{job} --help: {run.stderr[-2000:]}"


def check_config(root: Path, config: str, overrides: tuple[str, ...] = ()) -> None:
    assert (root / config).is_file(), f"{config} is named in cluster/ or docs/cluster.md but does not exist"
    cfg = load_config(root / config, list(overrides))      # UsageError: unknown key or bad value
    assert cfg.data.name


def override_keys(root: Path) -> list[str]:
    """Every KEY of a `--set KEY=VALUE` written anywhere in cluster/ or the doc (with or without a --config)."""
    return sorted({m for p in named_in(root) for t in command_texts(p)
                   for m in re.findall(r"--set[= ]\s*['\"]?([\w.]+)=", t)})


def check_override_key(key: str) -> None:
    """KEY must name a config field (a typo would otherwise only fail when the job runs)."""
    from pydantic import BaseModel

    from mel_ray.config import Config

    model: type[BaseModel] | None = Config
    for part in key.split("."):
        assert model is not None and part in model.model_fields, f"--set {key}: no such config key"
        annotation = model.model_fields[part].annotation
        if typing.get_origin(annotation) is dict:       # tune.train.<train key>: checked when the sweep runs
            return
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def check_token_auth(root: Path) -> None:
    for path in named_in(root):
        text = path.read_text()
        for mode in re.findall(r"RAY_AUTH_MODE[\"']?\s*(?:[=:]|\n\s*value:)\s*[\"']?(\w+)", text):
            assert mode == "token", f"{path}: RAY_AUTH_MODE={mode}"
        assert not re.search(r"(?i)\bmode:\s*[\"']?disabled|RAY_AUTH_MODE\W+disabled", text), \
            f"{path} switches token authentication off"
    assert re.search(r"^ENV\s[^\n]*RAY_AUTH_MODE=token", dockerfile(root), re.MULTILINE), "Dockerfile: RAY_AUTH_MODE"
    specs = kube_clusters(root)
    assert {name for name, _ in specs} >= {"raycluster.yaml", "rayjob.yaml"}
    for name, spec in specs:
        auth = spec.get("authOptions") or {}
        assert auth.get("mode") == "token" and auth.get("secretName"), f"{name}: authOptions"
        for c in containers(spec):       # head and workers: explicit, so older operators keep auth on too
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}: {c['name']} RAY_AUTH_MODE"
    launcher = load_yaml(root / "cluster" / "launcher.yaml")[0]
    options = " ".join(launcher["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in options
    token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    assert token_path in launcher["file_mounts"], "the token file named by RAY_AUTH_TOKEN_PATH is mounted"


def check_no_credentials(root: Path) -> None:
    for path in named_in(root):
        text = path.read_text()
        assert not AWS_KEY_ID.search(text), f"{path}: an AWS access key id"
        assert not SECRET_VALUE.search(text), f"{path}: a literal secret"
    for name, spec in kube_clusters(root):
        for c in containers(spec):
            for e in c.get("env", []):
                if e["name"] in SECRET_ENV:
                    assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), \
                        f"{name}: {e['name']} must come from a Secret"
    envs = [load_yaml(root / "cluster" / "runtime_env.yaml")[0]]
    envs += [yaml.safe_load(s) for _, s in runtime_env_yamls(root)]
    for env in envs:
        leaked = SECRET_ENV & set(env.get("env_vars", {}))
        assert not leaked, f"runtime_env sets {leaked}"
    options = " ".join(load_yaml(root / "cluster" / "launcher.yaml")[0]["docker"]["run_options"])
    assert not any(f"{name}=" in options for name in SECRET_ENV), "launcher run_options set a credential"


def runtime_env_yamls(root: Path) -> list[tuple[str, str]]:
    found = []
    for path in yaml_files(root):
        for doc in load_yaml(path):
            if isinstance(doc, dict) and doc.get("kind") == "RayJob" and doc["spec"].get("runtimeEnvYAML"):
                found.append((path.name, doc["spec"]["runtimeEnvYAML"]))
    return found


def check_image_paths(root: Path) -> None:
    """Absolute job/config paths (RayJob entrypoints) must be where the image or the launcher puts the project."""
    workdir = re.findall(r"^WORKDIR\s+(\S+)", dockerfile(root), re.MULTILINE)[-1]
    launcher = load_yaml(root / "cluster" / "launcher.yaml")[0]
    homes = {workdir, *(target for target, source in launcher["file_mounts"].items() if source == ".")}
    for path in named_in(root):
        for prefix in re.findall(r"(/[\w./-]+?)/(?:jobs|configs)/[\w/.-]+\.(?:py|yaml)\b", path.read_text()):
            assert prefix in homes, f"{path}: {prefix}/... is not the image's project folder {sorted(homes)}"


# ------------------------------------------------------------------------------------------------- tests


def test_the_cluster_files_exist_and_parse():
    names = {p.relative_to(ROOT).as_posix() for p in cluster_files(ROOT)}
    assert set(EXPECTED) <= names
    for path in yaml_files(ROOT):
        assert load_yaml(path), path
    kinds = {load_yaml(ROOT / "cluster/kuberay" / f)[0]["kind"] for f in ("raycluster.yaml", "rayjob.yaml")}
    assert kinds == {"RayCluster", "RayJob"}
    job = load_yaml(ROOT / "cluster/kuberay/rayjob.yaml")[0]["spec"]
    assert {"entrypoint", "rayClusterSpec", "submissionMode", "shutdownAfterJobFinishes"} <= set(job)
    assert JOB_RE.search(job["entrypoint"]) and CONFIG_RE.search(job["entrypoint"])
    groups = {g["groupName"] for _, spec in kube_clusters(ROOT) for g in spec["workerGroupSpecs"]}
    assert groups == {"cpu", "gpu"}
    for _, spec in kube_clusters(ROOT):
        gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
        assert all("nvidia.com/gpu" in c["resources"]["limits"] for c in gpu["template"]["spec"]["containers"])
    assert named_jobs(ROOT) and named_configs(ROOT) and commands(ROOT)


def test_the_launcher_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(ROOT / "cluster" / "launcher.yaml")[0]
    validate_config(prepare_config(config))                 # what `ray up` runs before touching the cloud
    types = config["available_node_types"]
    assert config["head_node_type"] in types and {"cpu", "gpu"} <= set(types)
    assert all("resources" in t for t in types.values())
    assert config["docker"]["image"] and config["setup_commands"] and "." in config["file_mounts"].values()


def test_the_runtime_envs_are_valid_ray_runtime_envs():
    from ray.runtime_env import RuntimeEnv

    env = load_yaml(ROOT / "cluster" / "runtime_env.yaml")[0]
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    excluded = {e.strip("/") for e in env["excludes"]}
    assert {".venv", "demo_out", "data"} <= excluded
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"} <= set(env["env_vars"])
    for _, text in runtime_env_yamls(ROOT):
        RuntimeEnv(**yaml.safe_load(text))


@pytest.mark.parametrize("job", named_jobs(ROOT))
def test_every_named_job_exists_and_starts(job):
    check_job(ROOT, job)


@pytest.mark.parametrize("config", named_configs(ROOT))
def test_every_named_config_exists_and_loads(config):
    check_config(ROOT, config)


@pytest.mark.parametrize("where,config,overrides", commands(ROOT))
def test_every_command_line_loads_with_its_overrides(where, config, overrides):
    check_config(ROOT, config, overrides)


@pytest.mark.parametrize("key", override_keys(ROOT))
def test_every_override_names_a_config_key(key):
    check_override_key(key)


def test_the_image_is_the_installed_ray_and_a_supported_python():
    import ray
    from packaging.specifiers import SpecifierSet

    m = re.search(r"^FROM\s+rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu\s*$", dockerfile(ROOT), re.MULTILINE)
    assert m, "FROM rayproject/ray:<version>-py<XY>-gpu"
    assert m.group(1) == ray.__version__
    pinned = re.search(r"^ray==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
    assert m.group(1) == pinned
    requires = re.search(r'requires-python\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"{m.group(2)}.{m.group(3)}" in SpecifierSet(requires)
    assert re.search(r"pip install[^\n]*-c constraints\.txt \.", dockerfile(ROOT))
    assert re.search(r"^COPY\b.*\bconfigs/", dockerfile(ROOT), re.MULTILINE)
    assert re.search(r"^COPY\b.*\bjobs/", dockerfile(ROOT), re.MULTILINE)
    for _, spec in kube_clusters(ROOT):
        assert spec["rayVersion"] == ray.__version__
    check_image_paths(ROOT)


def test_token_authentication_is_on_and_never_switched_off():
    check_token_auth(ROOT)


def test_no_credentials_are_written_down():
    check_no_credentials(ROOT)


def test_the_checks_fail_on_broken_copies(tmp_path):
    """Each check, run on a copy of the repository with one defect, must fail."""
    def copy(tmp: Path) -> Path:
        shutil.copytree(ROOT / "cluster", tmp / "cluster")
        (tmp / "docs").mkdir()
        shutil.copy(ROOT / "docs" / "cluster.md", tmp / "docs" / "cluster.md")
        for name in ("jobs", "configs", "mel_ray"):
            (tmp / name).symlink_to(ROOT / name)
        return tmp

    def edit(root: Path, rel: str, old: str, new: str) -> None:
        path = root / rel
        assert old in path.read_text(), (rel, old)
        path.write_text(path.read_text().replace(old, new, 1))

    good = copy(tmp_path / "good")
    check_token_auth(good)
    check_no_credentials(good)
    check_image_paths(good)

    missing = copy(tmp_path / "missing")
    edit(missing, "cluster/kuberay/rayjob.yaml", "jobs/pipeline.py", "jobs/missing.py")
    assert "jobs/missing.py" in named_jobs(missing)
    with pytest.raises(AssertionError, match="missing.py"):
        check_job(missing, "jobs/missing.py")

    bad_key = copy(tmp_path / "bad_key")
    edit(bad_key, "cluster/kuberay/rayjob.yaml", "--set train.num_workers=2", "--set train.num_wrokers=2")
    bad = [c for c in commands(bad_key) if "train.num_wrokers=2" in c[2]]
    assert bad
    with pytest.raises(UsageError, match="num_wrokers"):
        check_config(bad_key, bad[0][1], bad[0][2])
    assert "train.num_wrokers" in override_keys(bad_key)
    with pytest.raises(AssertionError, match="num_wrokers"):
        check_override_key("train.num_wrokers")

    for name, rel, old, new in [
            ("env_off", "cluster/kuberay/raycluster.yaml", "value: token", "value: disabled"),
            ("crd_off", "cluster/kuberay/rayjob.yaml", "mode: token", "mode: disabled"),
            ("image_off", "cluster/Dockerfile", "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
            ("launcher_off", "cluster/launcher.yaml", "--env RAY_AUTH_MODE=token", "--env RAY_AUTH_MODE=disabled")]:
        broken = copy(tmp_path / name)
        edit(broken, rel, old, new)
        with pytest.raises(AssertionError):
            check_token_auth(broken)

    fake_key = "AKIA" + "ABCDEFGHIJKLMNOP"
    fake_secret = "wJalrXUtnFEMI" + "/K7MDENG/bPxRfiCYEXAMPLEKEY"
    for name, rel, old, new in [
            ("key_id", "docs/cluster.md", "## 1. The image", f"AWS_ACCESS_KEY_ID={fake_key}\n## 1. The image"),
            ("secret", "cluster/runtime_env.yaml", "env_vars:", f"env_vars:\n  AWS_SECRET_ACCESS_KEY: {fake_secret}"),
            ("literal_env", "cluster/kuberay/raycluster.yaml",
             "valueFrom: {secretKeyRef: {name: mel-ray-s3, key: AWS_ACCESS_KEY_ID}}", "value: placeholder")]:
        broken = copy(tmp_path / name)
        edit(broken, rel, old, new)
        with pytest.raises(AssertionError):
            check_no_credentials(broken)

    moved = copy(tmp_path / "moved")
    edit(moved, "cluster/kuberay/rayjob.yaml", "/home/ray/mel-ray/jobs/", "/opt/elsewhere/jobs/")
    with pytest.raises(AssertionError, match="elsewhere"):
        check_image_paths(moved)
