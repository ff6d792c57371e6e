"""`procedural:demo` -- a TEST TOOL that stands in for a text-to-image model on the generated demo data.

THIS IS NOT A MODEL and says nothing about how Stable Diffusion would behave. It exists because the tiny
Stable Diffusion of `mel_ray.tiny_models` has random weights, so its "views" carry no information about the
prompt, and an experiment on the demo benchmark could never tell whether CVaCPT *can* use synthetic views.
This stand-in draws what a prompt's attribute clues describe, with the demo generator's own drawing code
(`mel_ray.demo_data.look` / `render`), so its views are informative exactly to the extent that the
mention sentence is. Use it only with demo releases (`mel_ray.demo_data`); on any other text it draws noise-
free shapes of random looks.

How a prompt becomes an image (the prompt is synthesize's "An image of {mention}: {sentence}"):

1. Clues. Every "property: value" statement the demo generator can say in a sentence (demo_data.CLUES, e.g.
   "from {v}" = country of citizenship or country of origin, "known for {v}" = genre) is looked for in the
   prompt, with {v} restricted to the values that property can take (its vocabulary, a year, a person's name
   or a city), so "in France" and "in the UTC+1 time zone" are read as different properties.
2. Type. Each entity type scores the clues it can produce; the event phrase of a sentence (demo_data.EVENTS)
   and words of the mention's name (building kinds such as "Tower", ship prefixes such as "HMS", animal
   nouns) count extra because only one type uses them. Ties are broken by the view's random generator.
3. Look. demo_data.look of a pseudo-entity holding the matched statements gives shape, fill colour,
   pattern and background exactly as the generator derives them from an entity's attributes. A look
   property the prompt does not mention, and the per-entity badge (it hashes the full attribute list, which
   no sentence holds), are drawn at random from the view's generator: different views then show different
   guesses, which is what CVaCPT's max-pool over n_s views is meant to cope with.
4. Drawing. demo_data.render with a small random shift and scale (as the KB images get), resized to the
   requested size.

Deterministic per (prompt, seed). The settings key of `synthesize` holds `identity()` instead of a weights
fingerprint, so its outputs never share a folder with a diffusion model's. It plugs into synthesize as a view
source (ProceduralSource); the dependency points from here to the synthesis stage, never the other way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from mel_ray import demo_data as dd
from mel_ray.config import SynthesizeConfig

PREFIX = "procedural:"
MODELS = ("procedural:demo",)
VERSION = 1               # bump when the same (prompt, seed) would draw different pixels

_NAME_HINTS = {           # words of a mention that only one entity type's names use
    "building": list(dd.BUILDING_KINDS),
    "ship": dd.SHIP_PREFIX,
    "animal": dd.ANIMAL_N,
}
_EVENT_WEIGHT = 3         # an event phrase or a name hint names the type outright
_NAME_WEIGHT = 2


def is_procedural(model: str) -> bool:
    return str(model).startswith(PREFIX)


def identity(model: str) -> dict:
    """What stands in for the weights fingerprint in synthesize's settings (and so its key)."""
    if model not in MODELS:
        raise ValueError(f"unknown procedural model {model!r}; expected one of {', '.join(MODELS)}")
    return {"procedural": model, "version": VERSION, "demo_data_format": dd.FORMAT_VERSION}


@dataclass(frozen=True)
class Clue:
    kind: str
    prop: str
    value: str


def _value_pattern(source) -> str:
    if isinstance(source, list):
        # longest first: "rock music" must not stop at "rock", "Grade II" must not match "Grade I"
        return "|".join(re.escape(v) for v in sorted(set(source), key=len, reverse=True))
    if source == "city":
        return "|".join(re.escape(c) for c in sorted(dd.CITIES, key=len, reverse=True))
    if source == "person":
        return r"[^\W\d_][\w'-]* [^\W\d_][\w'-]*"
    return r"\d{3,4}"                                  # "year:LO:HI"


@cache
def _clue_patterns() -> list[tuple[str, str, re.Pattern]]:
    """(kind, property, regex with one group for the value) for every sentence clue of every type."""
    out = []
    for kind, spec in dd.TYPES.items():
        for prop, _, source, _ in spec["props"]:
            for template in dd.CLUES.get(prop, []):
                before, after = (re.escape(part) for part in template.split("{v}"))
                value = _value_pattern(source)
                out.append((kind, prop, re.compile(rf"(?<!\w){before}({value})(?!\w){after}")))
    return out


def find_clues(prompt: str) -> list[Clue]:
    """Every (type, property, value) statement the prompt can be read as saying."""
    found = []
    for kind, prop, pattern in _clue_patterns():
        found.extend(Clue(kind, prop, m.group(1)) for m in pattern.finditer(prompt))
    return list(dict.fromkeys(found))


def type_scores(prompt: str, clues: list[Clue]) -> dict[str, int]:
    scores = {kind: len({c.prop for c in clues if c.kind == kind}) for kind in dd.TYPES}
    for kind, events in dd.EVENTS.items():
        scores[kind] += _EVENT_WEIGHT * sum(event in prompt for event in events)
    words = set(re.findall(r"\w+", prompt))
    for kind, hints in _NAME_HINTS.items():
        scores[kind] += _NAME_WEIGHT * any(h in words for h in hints)
    return scores


def prompt_look(prompt: str, rng: np.random.Generator) -> dict:
    """demo_data's look for what the prompt says; unsaid parts drawn from `rng`."""
    clues = find_clues(prompt)
    scores = type_scores(prompt, clues)
    best = max(scores.values())
    kinds = [k for k, s in scores.items() if s == best]
    kind = kinds[int(rng.integers(len(kinds)))]
    attrs = [(c.prop, c.value) for c in clues if c.kind == kind]
    look = dd.look({"kind": kind, "attrs": attrs, "qid": ""})
    said = {p for p, _ in attrs}
    colour_p, pattern_p, bg_p = dd.TYPES[kind]["look"]
    if colour_p not in said:
        look["fg"] = dd.PALETTE[int(rng.integers(len(dd.PALETTE)))]
    if pattern_p not in said:
        look["pattern"] = dd.PATTERNS[int(rng.integers(len(dd.PATTERNS)))]
    if bg_p not in said:
        look["bg"] = dd.BACKGROUNDS[int(rng.integers(len(dd.BACKGROUNDS)))]
    look["badge"] = dd.PALETTE[int(rng.integers(len(dd.PALETTE)))]
    look["badge_pos"] = int(rng.integers(4))
    return look


def _view_rng(prompt: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, dd.text_hash(prompt)])


def view_look(prompt: str, seed: int) -> dict:
    """The look that draw(prompt, seed) renders (for diagnostics: how often a view gets the gold's look)."""
    return prompt_look(prompt, _view_rng(prompt, seed))


def draw(prompt: str, seed: int, size: int = dd.IMG) -> np.ndarray:
    """uint8 [size, size, 3] image of the prompt's look; the same (prompt, seed) gives the same pixels."""
    rng = _view_rng(prompt, seed)
    look = prompt_look(prompt, rng)
    dx, dy = rng.uniform(-4, 4, size=2)
    img = dd.render(look, dx, dy, rng.uniform(0.85, 1.1))
    if size != dd.IMG:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    return img


class ProceduralPipeline:
    """What synthesize's ViewGenerator holds instead of a diffusers pipeline (see the module docstring): a
    synthesize.Drawer. No text encoder, so prompts are never cut."""

    def __init__(self, model: str, size: int = dd.IMG):
        identity(model)                      # fail on an unknown name before any image is drawn
        self.model, self.size = model, int(size)

    def fit(self, prompt: str) -> str:
        return prompt

    def generate(self, prompt: str, seed: int, size: int) -> np.ndarray:
        """float [0, 1] (H, W, 3), like the diffusers pipeline's output_type="np" image."""
        return draw(prompt, seed, size).astype(np.float32) / 255.0

    def draw(self, prompt: str, seed: int) -> tuple[np.ndarray, None]:
        return self.generate(prompt, seed, self.size), None


class ProceduralSource:
    """The synthesize.ViewSource for `procedural:` model strings; synthesize.VIEW_SOURCES names this class by
    its dotted path and imports it on first use (in the driver and in every Ray worker), so synthesize never
    imports this test tool."""

    def pin(self, model: str) -> str:
        return model                         # nothing to pin: the drawing code is versioned by VERSION

    def identity(self, model: str, cfg: SynthesizeConfig, cache_dir: str) -> dict:
        return identity(model)

    def load(self, model: str, settings: dict, cache_dir: str) -> ProceduralPipeline:
        return ProceduralPipeline(model, settings["size"])
