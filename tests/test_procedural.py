"""procedural:demo, the text-to-image TEST TOOL of mel_ray/procedural.py: it must draw the demo generator's look
for what a prompt says, deterministically, and plug into synthesize's output contract."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mel_ray import demo_data as dd
from mel_ray import procedural


def _clue(prop: str, value: str) -> str:
    return dd.CLUES[prop][0].format(v=value)


def _full_prompt(e: dict) -> str:
    """A sentence that names all three look properties of the entity (when it has them)."""
    clauses = [_clue(p, dd._first(e["attrs"], p)) for p in dd.TYPES[e["kind"]]["look"]
               if dd._first(e["attrs"], p) and p in dd.CLUES]
    return f"An image of {e['name']}: {e['name']} {dd.EVENTS[e['kind']][0]} ({' and '.join(clauses)})."


def _entities(kind: str, n: int = 12) -> list[dict]:
    ents = [dd._make_entity(7000 + u, kind) for u in range(200)]
    full = [e for e in ents if all(dd._first(e["attrs"], p) for p in dd.TYPES[kind]["look"])]
    return full[:n]


@pytest.mark.parametrize("kind", list(dd.TYPES))
def test_prompt_naming_attributes_draws_the_generators_look(kind):
    ents = _entities(kind)
    assert ents, f"no {kind} with all look attributes"
    for e in ents:
        prompt = _full_prompt(e)
        want = dd.look(e)
        got = procedural.prompt_look(prompt, np.random.default_rng(0))
        assert {k: got[k] for k in ("shape", "fg", "pattern", "bg")} == \
               {k: want[k] for k in ("shape", "fg", "pattern", "bg")}, prompt
        # pixels: against demo_data's own rendering of the entity. The pattern masks are fixed in image
        # coordinates, so a point well inside the shape has the same colour whatever the shift; the top edge
        # is background.
        img, ref = procedural.draw(prompt, seed=3), dd.render(want)
        inside = (38, 32) if want["shape"] == "boat" else (32, 32)
        assert tuple(img[inside]) == tuple(ref[inside]), prompt
        assert tuple(img[1, 32]) == tuple(ref[1, 32]) == want["bg"], prompt


def test_unsaid_look_varies_with_the_seed_said_look_does_not():
    e = _entities("person")[0]
    occupation = dd._first(e["attrs"], "occupation")
    prompt = f"An image of {e['name']}: {e['name']}, {_clue('occupation', occupation)}, poses for a portrait."
    looks = [procedural.prompt_look(prompt, np.random.default_rng(s)) for s in range(8)]
    assert {lk["shape"] for lk in looks} == {"circle"}
    assert {lk["fg"] for lk in looks} == {dd.look(e)["fg"]}
    assert len({lk["bg"] for lk in looks}) > 1          # never said: each view guesses


def test_deterministic_per_prompt_and_seed():
    prompt = "An image of HMS Tide: HMS Tide leaves the harbour (operated by Royal Navy)."
    a, b = procedural.draw(prompt, 11), procedural.draw(prompt, 11)
    assert a.dtype == np.uint8 and a.shape == (dd.IMG, dd.IMG, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, procedural.draw(prompt, 12))
    assert procedural.draw(prompt, 11, size=32).shape == (32, 32, 3)


def test_unknown_procedural_model_is_refused():
    with pytest.raises(ValueError, match="unknown procedural model"):
        procedural.ProceduralPipeline("procedural:sd")


def test_synthesize_writes_the_contract_with_a_key_of_its_own(small_dataset, tmp_path, ray_local):
    from mel_ray.config import SynthesizeConfig
    from mel_ray.synthesize import load_synthetic, synthesis_key, synthesis_settings, synthesize

    dataset = small_dataset                           # a private copy at tmp_path / "ds"
    section = SynthesizeConfig(views=2, size=64, num_gpus=0, batch_size=8)
    summary = synthesize(dataset, "procedural:demo", section, limit=5, splits=("train",))
    assert summary["generated"] == 10 and summary["settings"]["model"]["procedural"] == "procedural:demo"
    # same settings with a diffusion model's identity in place of the stand-in's: another folder
    assert synthesis_key(dict(summary["settings"], model={"fingerprint": "0" * 64})) != summary["key"]
    assert synthesis_key(synthesis_settings("procedural:demo", section)) == summary["key"]

    views = load_synthetic(dataset, summary["key"])
    rows = views.manifest.to_pylist()
    assert len(rows) == 10 and {r["view"] for r in rows} == {0, 1}
    assert all(r["prompt"].startswith("An image of ") and r["nsfw"] is None for r in rows)
    first = rows[0]
    png = (tmp_path / "ds" / first["uri"]).read_bytes()
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert np.array_equal(img, procedural.draw(first["prompt"], first["seed"], 64))
    assert pq.read_table(tmp_path / "ds" / "synthetic" / summary["key"] / "manifest.parquet").num_rows == 10

    again = synthesize(dataset, "procedural:demo", section.model_copy(update={"batch_size": 1}), limit=5,
                       splits=("train",))
    assert again["generated"] == 0 and again["key"] == summary["key"]
