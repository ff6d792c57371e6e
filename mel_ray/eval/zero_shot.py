"""The zero-shot floor: rank every mention against the whole KB with the encoder alone, no trained model.

    score(m, e) = cos(t_G(m), t_G(e)) + [m and e both have a real image] * cos(v_G(m), v_G(e))

t_G / v_G are a feature set's global vectors (text_global, image_global: what extract-features stored, CLIP's or
models.text_encoder's, pooled as models.text_pooling says). The image term counts only where BOTH rows have a
real image (has_image): a missing image is encoded as a blank, and two blanks are identical (cosine 1), so
without the mask every image-less entity would look like every image-less mention. On text-only data the score is
the pure text cosine. On data with images, an entity with an image gets its image cosine added and one without
gets nothing: the score is the sum, not the mean, of the cosines a pair has (a choice: the floor is the encoder's
plain similarity, not a tuned combination; docs/architecture.md "The zero-shot floor").

`ZeroShotScorer` has the trained model's scoring interface (entity_features / entity_side / mention_side /
pair_logits), so the exact sharded evaluation (mel_ray.eval.evaluate, ranker="zero-shot") ranks with it under
the same tie policy, metrics and output files. `paired_by_mention` compares two evaluations of the same mentions
(a trained model against this floor): McNemar's exact test on H@1 and Wilcoxon's signed-rank test on reciprocal
ranks (scipy).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from mel_ray import storage
from mel_ray.errors import DataError, UsageError
from mel_ray.feature_store import (
    add_gold,
    arrow_to_tensors,
    gold_ids,
    mention_shard_uris,
    read_manifest,
    text_pooling_of,
)

RANKER = "zero-shot"
MODEL = "model"
RANKERS = (MODEL, RANKER)
GLOBALS = ("text_global", "image_global")
SCORE = "cos(t_G) + cos(v_G) where mention and entity both have an image (has_image)"
NA = "n/a"


# ------------------------------------------------------------------------------------------ the features


def global_columns(manifest: dict, features_uri: str) -> list[str]:
    """The global vectors a set has (text_global, image_global); none is one line: nothing to rank by."""
    shapes = manifest.get("shapes") if isinstance(manifest, dict) else None
    have = [c for c in GLOBALS if isinstance(shapes, dict) and c in shapes]
    if not have:
        raise UsageError(f"{features_uri}: its manifest lists no global vectors ({' or '.join(GLOBALS)} in "
                         "'shapes'): zero-shot ranking compares those; use a feature set made by extract-features")
    return have


def encoder_of(manifest: dict) -> dict:
    """Which encoder made the set's global vectors: what a zero-shot report names."""
    text = manifest.get("text_encoder") or {}
    return {"clip": (manifest.get("model") or {}).get("id"), "text_encoder": text.get("id"),
            "text_pooling": text_pooling_of(manifest) if text else None,
            "fine_tuned": (manifest.get("settings") or {}).get("encoder_checkpoint")}


def _tensors(table: pa.Table, shapes: dict) -> dict:
    out = arrow_to_tensors(table, shapes)
    if "has_image" in table.column_names:
        out["has_image"] = torch.from_numpy(table.column("has_image").to_numpy().astype(bool))
    return out


class EntityGlobals:
    """The global vectors and has_image flags of a KB's entities (a view of an EntityStore's memory-mapped node
    cache): `chunk(a, b)` and `gather(ids)` as the store has them, for ZeroShotScorer."""

    def __init__(self, store):
        columns = [c for c in GLOBALS if c in store.table.column_names]
        self.table = store.table.select([*columns, "has_image"])
        self.shapes = store.shapes

    def chunk(self, start: int, stop: int) -> dict:
        return _tensors(self.table.slice(start, stop - start), self.shapes)

    def gather(self, ids: np.ndarray) -> dict:
        return _tensors(self.table.take(pa.array(np.asarray(ids, dtype=np.int64))), self.shapes)


def mention_globals(features_uri: str, dataset_uri: str, split: str) -> dict:
    """A split's mentions as evaluate reads them (mention_tensors), with only what zero-shot ranking reads: the
    global vectors, has_image, gold and mention_id."""
    manifest = read_manifest(features_uri)
    columns = ["mention_id", *global_columns(manifest, features_uri), "has_image"]
    table = pa.concat_tables([storage.read_table(u, columns=columns) for u in mention_shard_uris(features_uri, split)])
    table = add_gold(table, gold_ids(dataset_uri, split))
    out = _tensors(table, manifest["shapes"])
    out["mention_id"] = table.column("mention_id").to_pylist()
    return out


# ------------------------------------------------------------------------------------------- the scorer


class ZeroShotScorer(nn.Module):
    """Cosine of the global features, with the trained model's scoring interface (mel_ray.scoring.rank_counts)."""

    def __init__(self):
        super().__init__()
        # no weights; a buffer tells the scoring kernel which device it runs on
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    @staticmethod
    def _side(batch: dict) -> dict:
        side = {}
        if "text_global" in batch:
            side["text"] = F.normalize(batch["text_global"].float(), dim=-1)
        if "image_global" in batch and "has_image" in batch:
            side["image"] = F.normalize(batch["image_global"].float(), dim=-1)
            side["has_image"] = batch["has_image"].float()
        return side

    def entity_features(self, batch: dict) -> dict:
        return self._side(batch)

    def mention_features(self, batch: dict) -> dict:
        return self._side(batch)

    def entity_side(self, features: dict) -> dict:
        return {"globals": features}

    def mention_side(self, features: dict) -> dict:
        return {"globals": features}

    def pair_logits(self, ms: dict, es: dict) -> dict[str, torch.Tensor]:
        m, e = ms["globals"], es["globals"]
        rows, cols = next(iter(m.values())).shape[0], next(iter(e.values())).shape[0]
        score = m["text"].new_zeros(rows, cols) if "text" in m else m["image"].new_zeros(rows, cols)
        if "text" in m and "text" in e:
            score = score + m["text"] @ e["text"].T
        if "image" in m and "image" in e:
            both = (m["has_image"][:, None] * e["has_image"][None, :]) > 0
            score = score + torch.where(both, m["image"] @ e["image"].T, 0.0)
        return {"overall": score}


def zero_shot_state(features_uri: str) -> dict:
    """What evaluate's KB shards build their scorer from, for the zero-shot ranker (no weights)."""
    manifest = read_manifest(features_uri)
    global_columns(manifest, features_uri)
    return {"ranker": RANKER, "encoder": encoder_of(manifest)}


# ------------------------------------------------------------------------------ paired by mention


def _ranks(predictions: dict, what: str) -> dict[str, int]:
    ids, ranks = predictions["mention_id"], predictions["rank"]
    if len(set(ids)) != len(ids):
        raise DataError(what, "a mention_id occurs twice in its predictions", field="mention_id")
    return dict(zip(ids, (int(r) for r in ranks)))


def paired_by_mention(model: dict, floor: dict, model_name: str = "model", floor_name: str = RANKER) -> dict:
    """The trained model against the zero-shot floor on the same mentions: both are predictions (mention_id ->
    rank, as predictions_<split>.parquet holds them). Differences are model - floor.

    H@1: McNemar's exact test (scipy.stats.binomtest, two-sided, on the discordant mentions: right by one ranker
    only). MRR: Wilcoxon's signed-rank test on the per-mention reciprocal ranks (scipy.stats.wilcoxon, two-sided,
    zero differences dropped). p is "n/a" with a reason where no test can be made (no discordant mention, all
    differences zero)."""
    from scipy.stats import binomtest, wilcoxon

    a, b = _ranks(model, model_name), _ranks(floor, floor_name)
    if set(a) != set(b):
        raise DataError(floor_name, f"{len(set(a) ^ set(b))} mentions are ranked by only one of {model_name} and "
                        f"{floor_name}: they are not the same mentions", field="mention_id")
    ids = sorted(a)
    ra = np.array([a[i] for i in ids], dtype=np.float64)
    rb = np.array([b[i] for i in ids], dtype=np.float64)
    hit_a, hit_b = ra == 1, rb == 1
    only_a, only_b = int(np.sum(hit_a & ~hit_b)), int(np.sum(~hit_a & hit_b))
    n = len(ids)
    h1 = {"model_only": only_a, "zero_shot_only": only_b, "both": int(np.sum(hit_a & hit_b)),
          "test": "McNemar exact (two-sided binomial on the discordant mentions)", "p": NA, "reason": None}
    if only_a + only_b:
        h1["p"] = float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    else:
        h1["reason"] = "no discordant mention"
    diff = 1.0 / ra - 1.0 / rb
    rr = {"nonzero": int(np.count_nonzero(diff)), "test": "Wilcoxon signed-rank on reciprocal ranks (two-sided, "
          "zero differences dropped)", "statistic": NA, "p": NA, "reason": None}
    if rr["nonzero"]:
        result = wilcoxon(1.0 / ra, 1.0 / rb, zero_method="wilcox", alternative="two-sided")
        stat, p = float(result.statistic), float(result.pvalue)
        if math.isfinite(p):
            rr.update(statistic=stat, p=p)
        else:
            rr["reason"] = f"scipy.stats.wilcoxon gave p={p}"
    else:
        rr["reason"] = "every mention has the same rank under both"
    mean = (lambda x: float(np.mean(x))) if n else (lambda x: float("nan"))
    return {"mentions": n, "delta_H@1": mean(hit_a) - mean(hit_b), "delta_MRR": mean(1 / ra) - mean(1 / rb),
            "H@1": h1, "MRR": rr}


def comparison_line(paired: dict) -> str:
    """'H@1 +0.0123 (p=0.012), MRR +0.0081 (p=0.03)' for a paired_by_mention result."""
    def p(test: dict) -> str:
        return f"p={test['p']:.3g}" if test["p"] != NA else f"p n/a: {test['reason']}"

    return (f"H@1 {paired['delta_H@1']:+.4f} ({p(paired['H@1'])}), MRR {paired['delta_MRR']:+.4f} "
            f"({p(paired['MRR'])})")
