"""Damaged or foreign checkpoints and exported models: one line naming the file and what was expected, exit 2,
no traceback (mel_ray.checkpoints.validate, on the driver before any actor starts); and errors raised inside
Ray tasks and actors reach the user as their own one line (mel_ray.errors.unwrap in cli.run_guarded)."""

from __future__ import annotations

import collections
import pickle
import re
from pathlib import Path

import pytest
import torch

from mel_ray import cli, console
from mel_ray.checkpoints import export_model, load_checkpoint
from mel_ray.errors import DataError, NonFiniteError, UsageError, unwrap
from mel_ray.model import MELModel, ModelDims

DIMS = ModelDims(text_global=8, text_local=8, image_global=8, image_local=8, hidden=4)
EXPECTED = "expected a dict with 'state_dict' (model.pt) or 'model' (state.pt) and 'dims'"


class Foreign:
    """Not something torch.load(weights_only=True) may build."""


def weights() -> dict:
    torch.manual_seed(0)
    return MELModel(DIMS).state_dict()


def good_file(folder: Path) -> Path:
    return export_model({"model": weights(), "dims": DIMS.to_dict()}, {"models": {}}, folder / "good.pt")


# name -> (what the file holds: bytes written as they are, anything else torch.save'd; the message after "FILE: ")
CASES = {
    "random.pt": (b"\x13\x37" + bytes(range(256)) * 4,
                  f"not a mel-ray checkpoint: not a file torch.save wrote ({EXPECTED})"),
    "empty.pt": (b"", f"not a mel-ray checkpoint: the file is empty ({EXPECTED})"),
    "list.pt": ([1, 2, 3], f"not a mel-ray checkpoint: {EXPECTED}, got a list"),
    "tensor.pt": (torch.zeros(3), f"not a mel-ray checkpoint: {EXPECTED}, got a Tensor"),
    "no-dims.pt": ({"state_dict": "W"}, f"not a mel-ray checkpoint: {EXPECTED}; its keys: 'state_dict'"),
    "no-weights.pt": ({"dims": DIMS.to_dict(), "epoch": 3},
                      f"not a mel-ray checkpoint: {EXPECTED}; its keys: 'dims', 'epoch'"),
    "dims-list.pt": ({"state_dict": "W", "dims": [8, 8]},
                     "not a mel-ray checkpoint: 'dims' should be a dict of the model's sizes, got a list"),
    "dims-partial.pt": ({"state_dict": "W", "dims": {"text_global": 8, "colour": 1}},
                        ("not a mel-ray checkpoint: 'dims' does not describe a model (missing image_global, "
                        "image_local, text_local; unknown colour)")),
    "dims-negative.pt": ({"state_dict": "W", "dims": {**DIMS.to_dict(), "hidden": -3}},
                         ("not a mel-ray checkpoint: 'dims' does not describe a model (Trying to create tensor with "
                         "negative dimension -3: [-3, 8])")),
    "weights-list.pt": ({"state_dict": [1, 2], "dims": DIMS.to_dict()},
                        "not a mel-ray checkpoint: its weights should be a dict of tensors, got a list"),
    "weights-values.pt": ({"state_dict": {"a": 1}, "dims": DIMS.to_dict()},
                          ("not a mel-ray checkpoint: its weights should be a dict of tensors, got a dict holding "
                          "other values")),
    "config-list.pt": ({"state_dict": "W", "dims": DIMS.to_dict(), "config": ["x"]},
                       "not a mel-ray checkpoint: 'config' should be a dict (the resolved config), got a list"),
    "wrong-shapes.pt": ({"state_dict": "W", "dims": {**DIMS.to_dict(), "hidden": 6}},
                        ("weights do not match the model its 'dims' describe: w_ic.weight has shape "
                        "[4, 8], expected [6, 8]")),
    "extra-key.pt": ({"state_dict": "W+", "dims": DIMS.to_dict()},
                     "weights do not match the model its 'dims' describe: 1 unexpected (first: extra.weight)"),
    "missing-key.pt": ({"state_dict": "W-", "dims": DIMS.to_dict()},
                       "weights do not match the model its 'dims' describe: 1 missing (first: tglu.ln_t.bias)"),
    "rejected-pickle.pt": ({"state_dict": "W", "dims": DIMS.to_dict(), "x": Foreign},
                           (f"not a mel-ray checkpoint: it asks to run code when loaded ({Foreign.__module__}."
                            "Foreign): refused (model files are read as weights only: tensors, numbers, strings, "
                            "lists and dicts; a pickle never runs)")),
    "nan-weights.pt": ({"state_dict": "NaN", "dims": DIMS.to_dict()},
                       ("weights are not finite: 1 of 66 tensors hold NaN or inf (first: cmfu.w_g.weight); the model "
                       "cannot be evaluated or used")),
}


def write_case(folder: Path, name: str) -> Path:
    content, _ = CASES[name]
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
        return path
    if isinstance(content, dict) and isinstance(content.get("state_dict"), str):
        w = weights()
        kind = content["state_dict"]
        if kind == "W+":
            w["extra.weight"] = torch.zeros(1)
        elif kind == "W-":
            w.pop("tglu.ln_t.bias")
        elif kind == "NaN":
            w["cmfu.w_g.weight"] = w["cmfu.w_g.weight"].clone()
            w["cmfu.w_g.weight"][0, 0] = float("nan")
        content = {**content, "state_dict": w}
    torch.save(content, path)
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_damaged_checkpoint_is_one_line(tmp_path, name):
    path = write_case(tmp_path, name)
    with pytest.raises(DataError) as info:
        load_checkpoint(str(path))
    assert str(info.value) == f"{path}: {CASES[name][1]}"
    assert "\n" not in str(info.value)
    if name == "nan-weights.pt":
        assert isinstance(info.value, NonFiniteError)


def test_truncated_and_pickled_files(tmp_path):
    good = good_file(tmp_path)
    data = good.read_bytes()
    for cut in (len(data) // 2, 100, len(data) - 1):
        truncated = tmp_path / f"cut{cut}.pt"
        truncated.write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"^" + str(truncated) + r": not a mel-ray checkpoint: the file is damaged "
                           r"or truncated \(.+\)$") as info:
            load_checkpoint(str(truncated))
        assert "weights_only" not in str(info.value)     # torch's advice to load it unsafely is not repeated
    plain = tmp_path / "plain.pt"          # pickle.dumps of a dict of tensors: not what torch.save writes
    plain.write_bytes(pickle.dumps({"state_dict": collections.OrderedDict([("w", 1)])}, protocol=4))
    with pytest.raises(DataError, match="not a mel-ray checkpoint: not a file torch.save wrote"):
        load_checkpoint(str(plain))
    assert sorted(load_checkpoint(str(good))) == ["config", "dims", "model"]
    state = {"model": weights(), "optimizer": {}, "state": {"epoch": 1}, "dims": DIMS.to_dict()}
    folder = tmp_path / "checkpoint_000000"       # a Ray Train checkpoint folder: state.pt, no config
    folder.mkdir()
    torch.save(state, folder / "state.pt")
    assert load_checkpoint(str(folder))["config"] is None


class _RunsAShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


class _CallsEval:
    def __reduce__(self):
        return eval, ("__import__('os').getpid()",)


@pytest.mark.parametrize("writer", ["torch-zip", "torch-legacy", "pickle-0", "pickle-2", "pickle-4", "pickle-5"])
@pytest.mark.parametrize("payload", ["os.system", "eval"])
def test_a_pickle_that_asks_to_run_code_is_refused_as_such(tmp_path, writer, payload):
    """Whatever torch says (its wording varies by pickle protocol, and it advises weights_only=False), the user is
    told what the file is: it asks to run code, and it was refused. Nothing runs."""
    import io

    marker = tmp_path / "PWNED"
    evil = _RunsAShell(marker) if payload == "os.system" else _CallsEval()
    content = {"state_dict": {"w": torch.zeros(2)}, "dims": DIMS.to_dict(), "x": evil}
    buffer = io.BytesIO()
    if writer.startswith("torch"):
        torch.save(content, buffer, _use_new_zipfile_serialization=writer == "torch-zip")
    else:
        buffer.write(pickle.dumps(content, protocol=int(writer.split("-")[1])))
    path = tmp_path / "model.pt"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(DataError) as info:
        load_checkpoint(str(path))
    line = str(info.value)
    called = "posix.system" if payload == "os.system" else "eval"
    assert re.fullmatch(rf"{re.escape(str(path))}: not a mel-ray checkpoint: it asks to run code when loaded "
                        rf"\((__builtin__\.|builtins\.)?{re.escape(called)}\): refused \(model files are read as "
                        r"weights only: tensors, numbers, strings, lists and dicts; a pickle never runs\)", line), line
    assert "weights_only" not in line and "damaged" not in line
    assert not marker.exists()


def _cli(tmp_path: Path, capsys, *args: str) -> tuple[int, list[str]]:
    try:
        code = cli.main([*args, "--log-file", str(tmp_path / "cli.log")])
    finally:
        console.reset()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith(f"mel-ray {args[0]}: Ray's")]
    return code, lines


@pytest.mark.parametrize("name", ["random.pt", "list.pt", "tensor.pt", "no-dims.pt", "wrong-shapes.pt",
                                  "rejected-pickle.pt", "nan-weights.pt"])
def test_link_with_a_damaged_model_exits_2_with_one_line(tmp_path, capsys, name):
    path = write_case(tmp_path, name)
    expected = CASES[name][1]
    code, lines = _cli(tmp_path, capsys, "link", "--model", str(path), "--kb", str(tmp_path / "kb"),
                       "--mentions", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "out"))
    assert (code, lines) == (2, [f"error: {path}: {expected}"])


def test_missing_checkpoint_file_or_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere.pt"
    code, lines = _cli(tmp_path, capsys, "link", "--model", str(missing), "--kb", str(tmp_path / "kb"),
                       "--mentions", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "out"))
    assert (code, lines) == (2, [(f"error: {missing}: no such file (expected an exported model.pt or a "
                                 "checkpoint's state.pt)")])
    with pytest.raises(UsageError, match=r"^" + str(tmp_path) + r": no model.pt or state.pt there \(give an exported "
                       r"model, a checkpoint folder or an MLflow run id\)$"):
        load_checkpoint(str(tmp_path))


def test_errors_inside_ray_tasks_and_actors_are_their_own_line(ray_local, capsys):
    import ray

    @ray.remote
    def task():
        raise DataError("FILE.parquet", "bad value", record=3, field="x")

    @ray.remote
    class Init:
        def __init__(self):
            raise UsageError("shards: bad setting")

        def ping(self):
            return 1

    @ray.remote
    class Method:
        def run(self):
            raise NonFiniteError("CKPT", "split 'test': 2 of 9 mentions got non-finite scores")

    cases = [(lambda: ray.get(task.remote()), "error: FILE.parquet: record 3: field 'x': bad value"),
             (lambda: ray.get(Init.remote().ping.remote()), "error: shards: bad setting"),
             (lambda: ray.get(Method.remote().run.remote()),
              "error: CKPT: split 'test': 2 of 9 mentions got non-finite scores")]
    for call, line in cases:
        assert cli.run_guarded(lambda _argv, call=call: call(), [], debug=False) == 2
        # the test cluster forwards workers' own output (log_to_driver): "(Name pid=N) ..." lines are theirs
        ours = [x for x in capsys.readouterr().err.splitlines() if not re.match(r"^(\x1b\[\d+m)?\(\w+ pid=", x)]
        assert ours == [line]


def test_unwrap_walks_train_and_data_wrappers():
    from ray.exceptions import UserCodeException
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    inner = NonFiniteError("train run 'x'", "epoch 1, step 2 (split 'train'): the loss is nan")
    group = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(inner, "Traceback ...")})
    assert unwrap(group) is inner
    try:
        try:
            raise inner
        except NonFiniteError as err:
            raise UserCodeException("UDF failed to process a data block.") from err
    except UserCodeException as outer:
        assert unwrap(outer) is inner
    other = RuntimeError("not ours")
    assert unwrap(other) is other
