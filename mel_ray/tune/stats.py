"""Per-arm statistics of a sweep over seeds: the paper's "means of 5 runs" and paired t-tests.

An arm is one grid point without its seed (k, n_s and any other swept value: lr, w). With `tune.seeds` an arm
has one trial per seed; two arms are compared on the seeds where both have a finite result (paired by seed),
with a paired t-test (`scipy.stats.ttest_rel`). Trials that failed (a diverging run) or were stopped have no
result and take no part in a mean or a pair. Where a test cannot be made (fewer than 2 pairs, or differences
that are all equal, so a t statistic is 0/0 or infinite) p is the string "n/a" with the reason, never NaN.

Plain functions on the sweep's ablation rows ({"params": {...}, metric: value, ...}), unit-tested directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

SEED = "seed"
NA = "n/a"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def arm_of(params: Mapping) -> dict:
    """The arm of a trial: its grid values without the seed."""
    return {k: v for k, v in params.items() if k != SEED}


def arm_label(arm: Mapping) -> str:
    """'k=4, views=3': the arm as tune.baseline names it."""
    return ", ".join(f"{k}={v}" for k, v in arm.items()) or "(one arm)"


def summarize(values: Sequence) -> dict:
    """n, mean and sample std (ddof=1) of the finite values; std None with fewer than 2."""
    xs = [float(v) for v in values if _finite(v)]
    n = len(xs)
    mean = sum(xs) / n if n else None
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n >= 2 else None
    return {"n": n, "mean": mean, "std": std}


def arms_from_rows(rows: Sequence[Mapping], metrics: Sequence[str]) -> list[dict]:
    """One entry per arm, in the rows' (grid) order: its seeds, each metric's value per seed (None where the
    trial has no finite result) and their n / mean / std."""
    arms: dict[str, dict] = {}
    for row in rows:
        arm = arm_of(row["params"])
        entry = arms.setdefault(json.dumps(arm, sort_keys=True, default=str),
                                {"arm": arm, "name": arm_label(arm), "seeds": [], "values": {m: [] for m in metrics}})
        entry["seeds"].append(row["params"].get(SEED))
        for m in metrics:
            value = row.get(m)
            entry["values"][m].append(float(value) if _finite(value) else None)
    for entry in arms.values():
        entry["stats"] = {m: summarize(entry["values"][m]) for m in metrics}
    return list(arms.values())


def paired_test(baseline: Mapping, other: Mapping) -> dict:
    """Paired t-test of `other` - `baseline`, both {seed: value}; only seeds where both values are finite pair.

    Returns n_pairs, mean_diff (None without pairs), t and p (floats, or "n/a" with `reason`)."""
    seeds = [s for s in baseline if s in other and _finite(baseline[s]) and _finite(other[s])]
    diffs = [float(other[s]) - float(baseline[s]) for s in seeds]
    n = len(diffs)
    out = {"n_pairs": n, "seeds": seeds, "mean_diff": sum(diffs) / n if n else None, "t": NA, "p": NA,
           "reason": None}
    if n < 2:
        out["reason"] = f"{n} paired seed{'' if n == 1 else 's'} with a finite result in both arms (needs 2)"
        return out
    mean = out["mean_diff"]
    spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if spread <= 1e-12 * max(1.0, max(abs(d) for d in diffs)):
        out["reason"] = f"the {n} paired differences are all equal ({mean:+.4g}): zero variance, no t-test"
        return out
    from scipy.stats import ttest_rel

    result = ttest_rel([float(other[s]) for s in seeds], [float(baseline[s]) for s in seeds])
    t, p = float(result.statistic), float(result.pvalue)
    if not (math.isfinite(t) and math.isfinite(p)):
        out["reason"] = f"scipy.stats.ttest_rel gave t={t}, p={p}"
        return out
    return {**out, "t": t, "p": p}


def compare_with_baseline(arms: list[dict], baseline: Mapping, metrics: Sequence[str]) -> list[dict]:
    """Mark the baseline arm and give every other arm `vs_baseline`: {metric: paired_test(...)}."""
    index = find_arm(arms, baseline)
    base = arms[index]
    for i, entry in enumerate(arms):
        entry["baseline"] = i == index
        entry["vs_baseline"] = None if i == index else {
            m: paired_test(dict(zip(base["seeds"], base["values"][m])), dict(zip(entry["seeds"], entry["values"][m])))
            for m in metrics}
    return arms


def find_arm(arms: Sequence[Mapping], spec: Mapping) -> int:
    """The index of the one arm whose values match `spec` (a subset of its axes; numbers compared with
    isclose, so lr 1e-3 from YAML finds 0.001). ValueError naming tune.baseline when none or several match."""
    def matches(arm: Mapping) -> bool:
        return all(name in arm and _same(arm[name], value) for name, value in spec.items())

    found = [i for i, entry in enumerate(arms) if matches(entry["arm"])]
    if len(found) != 1:
        names = [arms[i]["name"] for i in found] if found else [a["name"] for a in arms]
        raise ValueError(f"tune.baseline {dict(spec)} names {len(found)} arms of the grid, not one "
                         f"({'matching' if found else 'the arms'}: {'; '.join(names)})")
    return found[0]


def _same(a, b) -> bool:
    if _finite(a) and _finite(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


# ------------------------------------------------------------------------------------------------ output


def _number(value, digits: int = 4, sign: bool = False) -> str:
    return f"{value:{'+' if sign else ''}.{digits}f}" if _finite(value) else "-"


def _mean_std(stats: Mapping, runs: int) -> str:
    if not stats["n"]:
        return "-"
    text = _number(stats["mean"]) + (f" ± {_number(stats['std'])}" if stats["std"] is not None else "")
    return text + (f" (n={stats['n']})" if stats["n"] != runs else "")


def _p(test: Mapping) -> str:
    if test["p"] == NA:
        return f"n/a ({test['reason']})"
    return f"{test['p']:.4g}"


def arms_markdown(arms: Sequence[Mapping], metrics: Sequence[str], baseline_source: str) -> str:
    """The arm section of ablation.md: mean ± std per arm, then each arm's paired comparison with the baseline."""
    names = list(arms[0]["arm"]) if arms else []
    header = ["n_s" if n == "views" else n for n in names]
    base = next(a for a in arms if a["baseline"])
    intro = ("An arm is a grid point without its seed: mean ± sample std (ddof=1) over the seeds with a finite "
             "result (seeds: how many of the arm's trials finished; failed or stopped trials give no number). "
             f"Baseline: **{base['name']}** ({baseline_source}).")
    lines = ["## Arms: mean ± std over seeds", "", intro, "",
             "| " + " | ".join([*header, "seeds", *metrics]) + " |",
             "|" + " --- |" * (len(header) + 1 + len(metrics))]
    for a in arms:
        runs = sum(1 for i in range(len(a["seeds"])) if any(a["values"][m][i] is not None for m in metrics))
        cells = [str(a["arm"][n]) for n in names] + [f"{runs} of {len(a['seeds'])}"]
        cells += [_mean_std(a["stats"][m], runs) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    method = ("Paired by seed over the seeds where both arms have a finite result; mean diff = arm - baseline; "
              "two-sided paired t-test (scipy.stats.ttest_rel).")
    lines += ["", f"### Paired comparisons with the baseline ({base['name']})", "", method, "",
              "| " + " | ".join([*header, "metric", "pairs", "mean diff", "t", "p"]) + " |",
              "|" + " --- |" * (len(header) + 5)]
    for a in arms:
        if a["baseline"]:
            continue
        for m in metrics:
            test = a["vs_baseline"][m]
            cells = [str(a["arm"][n]) for n in names]
            cells += [m, str(test["n_pairs"]), _number(test["mean_diff"], sign=True), _number(test["t"], 3), _p(test)]
            lines.append("| " + " | ".join(cells) + " |")
    if len(arms) == 1:
        lines.append("| " + " | ".join(["-"] * (len(header) + 5)) + " |")
    return "\n".join(lines) + "\n"
