"""The embedded demo end to end (what `make demo` runs), its resumability, and the thin jobs/ entrypoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mel_ray import cli
from mel_ray.dataset import load_dataset
from mel_ray.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    run_demo(str(root), config_path=str(ROOT / "configs" / "demo.yaml"), until="data")
    return root


def test_demo_builds_two_datasets_and_a_merged_one(demo_root):
    parts = [load_dataset(str(demo_root / "datasets" / f"demo{s}")) for s in (0, 1)]
    merged = load_dataset(str(demo_root / "datasets" / "demo-merged"))
    qids = [set(p.entities(columns=["qid"]).column("qid").to_pylist()) for p in parts]
    assert merged.num_entities == len(qids[0] | qids[1])
    assert qids[0] & qids[1], "the two demo seeds are meant to overlap so merge de-duplicates"
    for split in ("train", "dev", "test"):
        assert merged.manifest["counts"][split] == sum(p.manifest["counts"][split] for p in parts)
    # gold qids survive the id remapping
    ent_qids = merged.entities(columns=["qid"]).column("qid").to_pylist()
    test = merged.mentions("test").to_pylist()
    assert all(ent_qids[m["entity_id"]] == m["qid"] for m in test)
    assert (demo_root / "models" / "clip" / "config.json").exists()
    assert (demo_root / "models" / "stable-diffusion" / "model_index.json").exists()


def test_demo_rerun_skips_finished_steps(demo_root, capsys):
    before = {p: p.stat().st_mtime_ns for p in (demo_root / "datasets").rglob("*.parquet")}
    summary = run_demo(str(demo_root), config_path=str(ROOT / "configs" / "demo.yaml"), until="data")
    out = capsys.readouterr().out
    assert "ingest" not in out and "==> merge" not in out
    after = {p: p.stat().st_mtime_ns for p in (demo_root / "datasets").rglob("*.parquet")}
    assert before == after
    assert summary["entities"] == load_dataset(str(demo_root / "datasets" / "demo-merged")).num_entities
    assert summary["entities_sharing_a_name"] >= 0.2


def test_cli_info_prints_the_manifest(demo_root, capsys):
    assert cli.main(["info", str(demo_root / "datasets" / "demo0")]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "demo0"


def _job(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], capture_output=True, text=True,
                          check=False,
                          cwd=ROOT, env=os.environ.copy(), timeout=300)


def test_jobs_ingest_and_merge_from_a_config(demo_root, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    out0, out1, merged = tmp_path / "d0", tmp_path / "d1", tmp_path / "m"
    cfg.write_text("data:\n  name: d0\n  ingest:\n    format: mimic\n")
    r = _job("ingest.py", "--config", str(cfg), "--set", f"data.dataset={out0}",
             "--set", f"data.ingest.input={demo_root / 'raw' / 'demo0'}")
    assert r.returncode == 0, r.stderr
    assert "ingested" in r.stdout
    r = _job("ingest.py", "--config", str(cfg), "--set", f"data.dataset={out0}",
             "--set", f"data.ingest.input={demo_root / 'raw' / 'demo0'}")
    assert r.returncode == 0 and "already ingested" in r.stdout
    r = _job("ingest.py", "--config", str(cfg), "--set", f"data.dataset={out1}", "--set", "data.name=d1",
             "--set", f"data.ingest.input={demo_root / 'raw' / 'demo1'}")
    assert r.returncode == 0, r.stderr
    r = _job("merge.py", "--config", str(cfg), "--set", f"data.dataset={merged}", "--set", "data.name=m",
             "--set", f"data.merge=[{out0}, {out1}]")
    assert r.returncode == 0, r.stderr
    assert load_dataset(str(merged)).manifest["source_format"] == "merge"


def test_job_with_bad_config_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  nmae: typo\n")
    r = _job("ingest.py", "--config", str(cfg))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'data.nmae'" in lines[0] and "allowed here:" in lines[0]


def test_cli_make_demo_data_and_ingest_with_overrides(tmp_path, capsys):
    assert cli.main(["make-demo-data", "--output", str(tmp_path / "raw"), "--entities", "60",
                     "--mentions", "80", "--seed", "3"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entities"] == 60
    assert cli.main(["ingest", "--format", "mimic", "--input", str(tmp_path / "raw"), "--output",
                     str(tmp_path / "ds"), "--reference-images", "--set", "data.ingest.check_images=true"]) == 0
    ds = load_dataset(str(tmp_path / "ds"))
    report = ds.report()
    assert report["options"]["check_images"] is True and report["options"]["copy_images"] is False
    uris = [u for row in ds.entities(columns=["image_uris"]).column("image_uris").to_pylist() for u in row]
    assert uris and all(os.path.isabs(u) for u in uris)


def test_demo_mines_negatives_and_the_job_reuses_them(demo_root):
    merged = demo_root / "datasets" / "demo-merged"
    assert (merged / "negatives" / "k8.parquet").exists() and (merged / "negatives" / "k8.manifest.json").exists()
    r = _job("mine_negatives.py", "--config", str(ROOT / "configs" / "demo.yaml"), "--set", f"data.dataset={merged}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["skipped"] is True


# a demo-like run at its smallest (procedural views, one epoch, a one-trial sweep): what the terminal shows
SMALL_DEMO = ["--set", "models.diffusion=procedural:demo", "--set", "synthesize.views=1", "--set", "train.epochs=1",
              "--set", "tune.k=[2]", "--set", "tune.views=[1]", "--set", "tune.train.epochs=1"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_prints_a_page_and_logs_the_rest(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MEL_RAY_VERBOSE")}
    r = subprocess.run([sys.executable, "-m", "mel_ray.cli", "demo", "--config", str(ROOT / "configs" / "demo.yaml"),
                        "--output", str(out), *SMALL_DEMO], capture_output=True, text=True, check=False, cwd=ROOT,
                       env=env, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) <= 80, "\n".join(lines)
    assert "| split | H@1 |" in r.stdout                        # the test metrics table
    assert "| k | n_s |" in r.stdout                           # the sweep table
    log = out / "logs" / "demo.log"
    assert f"log:     {log}" in r.stdout and "mlflow ui --backend-store-uri sqlite:///" in r.stdout
    for noise in ("PlacementGroupCleaner", "is illegal", "RayDeprecationWarning", "torchvision", "it/s]",
                  "logging_progress", "(pid=", "worker processes have been started"):
        assert noise not in r.stdout + r.stderr, noise
    text = log.read_text()
    assert "Ray " in text and "session logs" in text          # where the workers' output is
