"""Per-arm statistics of a sweep over seeds (mel_ray.tune.stats): mean ± sample std per arm, paired t-tests against
the baseline arm, checked against hand computations; "n/a" with the reason where no test can be made."""

from __future__ import annotations

import math

import pytest

from mel_ray.config import load_config
from mel_ray.errors import UsageError
from mel_ray.tune import stats
from mel_ray.tune.sweep import arm_statistics

METRICS = ("dev_MRR", "test_MRR")
NAN = float("nan")


def _row(k: int, seed: int, dev: float, test: float, status: str = "done") -> dict:
    return {"params": {"k": k, "views": 2, "seed": seed}, "dev_MRR": dev, "test_MRR": test, "status": status}


def _rows() -> list[dict]:
    """Arm k=2 (baseline) and arm k=4 over seeds 1..3; k=6 diverged on seed 2 (NaN) and on seed 3 (failed)."""
    return [_row(2, 1, 0.50, 0.40), _row(2, 2, 0.60, 0.42), _row(2, 3, 0.70, 0.47),
            _row(4, 1, 0.51, 0.41), _row(4, 2, 0.62, 0.43), _row(4, 3, 0.73, 0.48),
            _row(6, 1, 0.55, 0.45), _row(6, 2, NAN, NAN), _row(6, 3, NAN, NAN, "failed")]


def test_arms_from_rows_mean_and_sample_std_over_seeds():
    arms = stats.arms_from_rows(_rows(), METRICS)
    assert [a["name"] for a in arms] == ["k=2, views=2", "k=4, views=2", "k=6, views=2"]
    assert arms[0]["seeds"] == [1, 2, 3] and arms[0]["values"]["dev_MRR"] == [0.50, 0.60, 0.70]
    dev = arms[0]["stats"]["dev_MRR"]
    assert dev["n"] == 3 and dev["mean"] == pytest.approx(0.6)
    assert dev["std"] == pytest.approx(0.1)                     # sqrt((0.01 + 0 + 0.01) / (3 - 1))
    test = arms[0]["stats"]["test_MRR"]                         # 0.40, 0.42, 0.47: mean 0.43
    assert test["mean"] == pytest.approx(0.43)
    assert test["std"] == pytest.approx(math.sqrt((0.03 ** 2 + 0.01 ** 2 + 0.04 ** 2) / 2))
    diverged = arms[2]
    assert diverged["values"]["dev_MRR"] == [0.55, None, None]   # NaN / failed: no number
    assert diverged["stats"]["dev_MRR"] == {"n": 1, "mean": pytest.approx(0.55), "std": None}


def test_paired_test_matches_the_t_distribution_by_hand():
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3) = 2 sqrt 3 on 2 degrees of
    # freedom, whose two-sided p is 1 - t / sqrt(t^2 + 2) (the t distribution's CDF for df = 2)
    base, arm = {1: 0.50, 2: 0.60, 3: 0.70}, {1: 0.51, 2: 0.62, 3: 0.73}
    out = stats.paired_test(base, arm)
    t = 2 * math.sqrt(3)
    assert out["n_pairs"] == 3 and out["reason"] is None and out["seeds"] == [1, 2, 3]
    assert out["mean_diff"] == pytest.approx(0.02)
    assert out["t"] == pytest.approx(t)
    assert out["p"] == pytest.approx(1 - t / math.sqrt(t * t + 2))      # 0.0742
    # two pairs (df = 1, the Cauchy distribution): differences 0.01, 0.03, t = 0.02 / (sqrt(2) * 0.01 / sqrt 2)
    # = 2, p = 1 - (2 / pi) atan(2); seed 3 does not pair (NaN in the arm), seed 4 is the baseline's only
    out = stats.paired_test({1: 0.5, 2: 0.6, 3: 0.7, 4: 0.1}, {1: 0.51, 2: 0.63, 3: NAN})
    assert out["n_pairs"] == 2 and out["seeds"] == [1, 2]
    assert out["t"] == pytest.approx(2.0)
    assert out["p"] == pytest.approx(1 - 2 / math.pi * math.atan(2.0))  # 0.2952
    # arm worse than baseline: the sign follows arm - baseline
    assert stats.paired_test(arm, base)["t"] == pytest.approx(-t)


def test_paired_test_says_n_a_with_the_reason():
    one = stats.paired_test({1: 0.5, 2: 0.6}, {1: 0.55, 2: NAN})
    assert (one["n_pairs"], one["p"], one["t"]) == (1, "n/a", "n/a") and one["mean_diff"] == pytest.approx(0.05)
    assert one["reason"] == "1 paired seed with a finite result in both arms (needs 2)"
    none = stats.paired_test({1: 0.5}, {2: 0.5})
    assert (none["n_pairs"], none["mean_diff"], none["p"]) == (0, None, "n/a")
    assert none["reason"] == "0 paired seeds with a finite result in both arms (needs 2)"
    # differences all equal (0.1, 0.1, 0.1 up to float rounding): scipy would say p = 0 or NaN; we say n/a
    same = stats.paired_test({1: 0.2, 2: 0.3, 3: 0.7}, {1: 0.3, 2: 0.4, 3: 0.8})
    assert same["p"] == "n/a" and "all equal" in same["reason"] and same["mean_diff"] == pytest.approx(0.1)
    zero = stats.paired_test({1: 0.2, 2: 0.3}, {1: 0.2, 2: 0.3})
    assert zero["p"] == "n/a" and "zero variance" in zero["reason"]


def test_arm_statistics_against_the_named_or_first_baseline():
    data, text = arm_statistics([{**r, "dev_H@1": NAN, "test_H@1": NAN} for r in _rows()], None)
    assert data["baseline"] == {"arm": {"k": 2, "views": 2}, "name": "k=2, views=2",
                                "source": "the grid's first arm; set tune.baseline to choose another"}
    k2, k4, k6 = data["arms"]
    assert k2["baseline"] and k2["vs_baseline"] is None
    assert k4["vs_baseline"]["dev_MRR"]["p"] == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14))
    assert k6["vs_baseline"]["dev_MRR"]["p"] == "n/a" and k6["vs_baseline"]["dev_MRR"]["n_pairs"] == 1
    assert k4["vs_baseline"]["dev_H@1"]["n_pairs"] == 0          # a metric nobody has: no pairs, no p
    assert "Baseline: **k=2, views=2** (the grid's first arm" in text
    assert "| 2 | 2 | 3 of 3 | - | 0.6000 ± 0.1000 | - | 0.4300 ± 0.0361 |" in text
    assert "| 6 | 2 | 1 of 3 | - | 0.5500 | - | 0.4500 |" in text
    assert "| 4 | 2 | dev_MRR | 3 | +0.0200 | 3.464 | 0.07418 |" in text
    assert "| 6 | 2 | dev_MRR | 1 | +0.0500 | - | n/a (1 paired seed with a finite result in both arms (needs 2)) |" \
        in text

    data, text = arm_statistics(_rows(), {"k": 4})                 # tune.baseline names the arm
    assert data["baseline"]["name"] == "k=4, views=2" and data["baseline"]["source"] == "tune.baseline"
    assert data["arms"][0]["vs_baseline"]["dev_MRR"]["t"] == pytest.approx(-2 * math.sqrt(3))
    assert "| 2 | 2 | dev_MRR | 3 | -0.0200 | -3.464 | 0.07418 |" in text


def test_tune_baseline_must_name_one_arm_of_the_grid():
    grid = ["tune.k=[2,4]", "tune.views=[1,2]", "tune.lr=[1e-3, 1e-2]"]
    cfg = load_config(None, [*grid, "tune.baseline={k: 4, views: 2, lr: 1e-3}"])
    assert cfg.tune.baseline == {"k": 4, "views": 2, "lr": 0.001}
    assert load_config(None, ["tune.k=[2,4]", "tune.views=[2]", "tune.baseline={k: 4}"]).tune.baseline == {"k": 4}
    assert load_config(None, grid).tune.baseline is None
    with pytest.raises(UsageError, match=r"tune.baseline \{'k': 4, 'views': 2\} names 2 arms of the grid, not one "
                                         r"\(matching: k=4, views=2, lr=0.001; k=4, views=2, lr=0.01\)"):
        load_config(None, [*grid, "tune.baseline={k: 4, views: 2}"])
    with pytest.raises(UsageError, match=r"tune.baseline \{'k': 3, 'views': 2, 'lr': 0.001\} names 0 arms"):
        load_config(None, [*grid, "tune.baseline={k: 3, views: 2, lr: 1e-3}"])
    with pytest.raises(UsageError, match=r"keys among \['k', 'lr', 'views'\] \(not \['seed'\]\)"):
        load_config(None, [*grid, "tune.baseline={k: 4, views: 2, lr: 1e-3, seed: 1}"])
    with pytest.raises(UsageError, match=r"'tune.baseline': Input should be a valid dictionary"):
        load_config(None, [*grid, "tune.baseline=k=4"])
