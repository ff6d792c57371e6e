"""cluster/ and docs/cluster.md: every job entrypoint and config they name exists and loads, the image's Ray
matches the installed one, token authentication is never switched off, and no credentials are written down."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mel_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(p for p in (ROOT / "cluster").rglob("*") if p.is_file())
YAML_FILES = [p for p in CLUSTER_FILES if p.suffix in (".yaml", ".yml")]
NAMED_IN = [*CLUSTER_FILES, ROOT / "docs" / "cluster.md"]


def _named(pattern: str) -> set[str]:
    found: set[str] = set()
    for path in NAMED_IN:
        found |= set(re.findall(pattern, path.read_text()))
    return found


JOBS = sorted(_named(r"\bjobs/[a-z_]+\.py\b"))
CONFIGS = sorted(_named(r"\bconfigs/[\w/.-]+\.yaml\b"))


def test_the_cluster_files_exist_and_parse():
    names = {p.relative_to(ROOT).as_posix() for p in CLUSTER_FILES}
    assert {"cluster/Dockerfile", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
            "cluster/launcher.yaml", "cluster/runtime_env.yaml"} <= names
    for path in YAML_FILES:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, path
    kinds = {yaml.safe_load((ROOT / "cluster/kuberay" / f).read_text())["kind"] for f in ("raycluster.yaml", "rayjob.yaml")}
    assert kinds == {"RayCluster", "RayJob"}
    assert JOBS and CONFIGS, "the manifests and docs name entrypoints and configs"


@pytest.mark.parametrize("job", JOBS)
def test_every_named_job_exists_and_starts(job):
    assert (ROOT / job).is_file(), f"{job} is named in cluster/ or docs/cluster.md but does not exist"
    run = subprocess.run([sys.executable, job, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0 and "--config" in run.stdout, run.stderr[-2000:]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_named_config_exists_and_loads(config):
    assert (ROOT / config).is_file(), f"{config} is named in cluster/ or docs/cluster.md but does not exist"
    assert load_config(ROOT / config).data.name


def test_the_image_runs_the_installed_ray_version_and_python():
    import ray

    base = re.search(r"^FROM\s+(\S+)", (ROOT / "cluster" / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}")
    assert base.endswith("-gpu")
    for path in YAML_FILES:
        text = path.read_text()
        for version in re.findall(r'rayVersion:\s*"?([\d.]+)', text):
            assert version == ray.__version__, path


def test_token_authentication_is_never_switched_off():
    for path in CLUSTER_FILES:
        text = path.read_text()
        for mode in re.findall(r"RAY_AUTH_MODE\s*[=:]\s*\n?\s*(?:value:\s*)?(\w+)", text):
            assert mode == "token", f"{path}: RAY_AUTH_MODE={mode}"
        assert not re.search(r"mode:\s*disabled", text), path
    for path in (ROOT / "cluster/kuberay/raycluster.yaml", ROOT / "cluster/kuberay/rayjob.yaml"):
        text = path.read_text()
        assert re.search(r"authOptions:\s*\n\s*mode:\s*token", text), path


def test_no_credentials_are_written_down():
    key_id = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
    secret = re.compile(r"(?i)(secret_access_key|auth_token|password)\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{20,}")
    for path in NAMED_IN:
        text = path.read_text()
        assert not key_id.search(text) and not secret.search(text), path
