"""Verdicts in plain words: pass / warn / fail per headline metric against its matched baseline.

A metric's verdict reads the difference d = synthetic − baseline (same n, same reference) and its
95 % interval, turned into "worse by" w (w = d for lower-is-better metrics, −d for higher-is-better
ones, |d| for "match" metrics, whose real value is the target: intra-class SSIM far *below* real's is
not more diversity but images that do not share their class's structure, e.g. noise):

- pass: the interval of w reaches w ≤ warn margin — the cohort is not shown to be worse than real
  data by more than the margin (a perfect generator passes up to sampling noise); its reason says
  whether the difference is within sampling noise, better beyond its CI, or within the warn margin;
- fail: w is above the warn margin with 95 % confidence *and* its estimate exceeds the fail margin;
- warn: otherwise (measurably, but not materially, worse);
- not judged (verdict None): no interval at this n (too few images to resample), so "beyond its
  CI" cannot be claimed either way; for TSTR, a real baseline whose interval reaches the test split's
  majority-class accuracy (nothing learned to compare with); or not computed at all (skipped: too
  few images, non-finite features); the reason says so and the report's sentence lists it. A report
  whose judged metrics all pass but which has unjudged ones is "warn", never "fit for use".

Margins are absolute for bounded metrics (fractions, accuracies, SSIM) and, for KID, multiples of
the baseline's own interval width ("noise"): KID's scale depends on the extractor.
"""

from __future__ import annotations

from typing import Any, Literal

Verdict = Literal["pass", "warn", "fail"]
UNJUDGED = "too few images for an interval"  # why a computed metric is not judged
UNCOMPUTED = "not computed, see the warnings"  # a metric with a rule that was skipped (too few images, NaN)
# TSTR when its real baseline does not beat always answering the commonest test class: nothing to compare with
AT_CHANCE = "real images at this n classify no better than always predicting the commonest class"

# metric: (better: lower | higher | match, warn margin, fail margin, margin unit, what the reader is told)
RULES: dict[str, tuple[str, float, float, str, str]] = {
    "kid": ("lower", 0.0, 2.0, "noise", "distribution distance (KID)"),
    "precision": ("higher", 0.02, 0.10, "abs", "realism (precision)"),
    "recall": ("higher", 0.02, 0.10, "abs", "variety (recall)"),
    "coverage": ("higher", 0.02, 0.10, "abs", "coverage of the real data"),
    "label_fidelity": ("higher", 0.02, 0.10, "abs", "images look like their class (label fidelity)"),
    "intra_class_ssim": ("match", 0.02, 0.10, "abs", "diversity within a class (intra-class SSIM)"),
    "flagged_fraction": ("lower", 0.01, 0.05, "abs", "copies of training images (memorization)"),
    "closer_to_train": ("lower", 0.03, 0.10, "abs", "nearer to the training split than to held-out data"),
    "tstr_accuracy": ("higher", 0.03, 0.10, "abs", "usefulness for training a classifier (TSTR)"),
}


def judge(metric: str, value: float | None, baseline: float | None, diff_ci: list[float] | None,
          baseline_ci: list[float] | None = None) -> dict[str, Any] | None:
    """{"verdict", "label", "reason"} of one headline metric; None when the metric has no rule; verdict
    None (with "why") when it was not computed or its difference has no interval."""
    if metric not in RULES:
        return None
    better, warn_m, fail_m, unit, label = RULES[metric]
    if value is None or baseline is None:
        return {"verdict": None, "label": label, "why": UNCOMPUTED, "reason": f"{label}: {UNCOMPUTED}"}
    how = "lower" if value < baseline else "higher"
    if not diff_ci or (unit == "noise" and not baseline_ci):  # a margin in noise units needs the noise
        return {"verdict": None, "label": label, "why": UNJUDGED,
                "reason": f"{label}: {value:.4g} vs real {baseline:.4g} ({how}; not judged: {UNJUDGED})"}
    if unit == "noise":
        width = baseline_ci[1] - baseline_ci[0]
        warn_m, fail_m = warn_m * width, fail_m * width
    if better == "match":  # w = |d|; its interval starts at 0 when d's interval straddles 0
        worse = abs(value - baseline)
        lo_worse = 0.0 if diff_ci[0] <= 0 <= diff_ci[1] else min(abs(diff_ci[0]), abs(diff_ci[1]))
        hi_worse = max(abs(diff_ci[0]), abs(diff_ci[1]))
    else:
        sign = 1.0 if better == "lower" else -1.0
        worse = sign * (value - baseline)
        lo_worse, hi_worse = sorted((sign * diff_ci[0], sign * diff_ci[1]))
    if lo_worse <= warn_m:
        v: Verdict = "pass"
    elif worse > fail_m:
        v = "fail"
    else:
        v = "warn"
    near = ("within sampling noise of real data" if lo_worse <= 0 <= hi_worse  # the interval of w holds 0
            else "better than real beyond its CI" if hi_worse < 0 else f"within the warn margin {warn_m:.3g} of real data")
    off = "differs from real" if better == "match" else "worse"  # a match metric's deviation either way
    why = {"pass": near,
           "warn": f"{off} beyond its CI, within the fail margin {fail_m:.3g}",
           "fail": f"{off} beyond its CI and past the fail margin {fail_m:.3g}"}[v]
    return {"verdict": v, "label": label, "reason": f"{label}: {value:.4g} vs real {baseline:.4g} ({how}; {why})"}


def judge_tstr(value: float, baseline: float, diff_ci: list[float] | None, baseline_ci: list[float] | None,
               floor: float | None) -> dict[str, Any] | None:
    """TSTR accuracy against real training images at the same n; not judged when that real classifier's
    interval reaches the majority-class accuracy ``floor`` — neither classifier then shows it learned
    anything, so a "pass" would only say that two guesses tie."""
    if floor is not None and baseline_ci and baseline_ci[0] <= floor:
        label = RULES["tstr_accuracy"][4]
        return {"verdict": None, "label": label, "why": AT_CHANCE,
                "reason": f"{label}: {value:.4g} vs real {baseline:.4g} (not judged: real at this n "
                          f"[{baseline_ci[0]:.3g}, {baseline_ci[1]:.3g}] reaches the commonest class's share "
                          f"{floor:.3g})"}
    return judge("tstr_accuracy", value, baseline, diff_ci)


def overall(verdicts: dict[str, dict[str, Any] | None], small_n: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's opening sentence: the worst verdict and the reasons behind it. ``small_n``
    ({"metrics", "n", "reliable_n"}): judged metrics computed on fewer images than ``reliable_n``; the
    sentence ends by saying so (and the verdict keeps it), whatever the verdict."""
    out = _overall(verdicts)
    if small_n and small_n["metrics"]:
        names = small_n["metrics"]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        out["small_n"] = small_n
        out["sentence"] += (f" Small sample: {listed} compare{'s' if len(names) == 1 else ''} only {small_n['n']} "
                            f"images per side (< {small_n['reliable_n']}), where one draw can move a verdict; "
                            "generate more images before trusting them.")
    return out


def _overall(verdicts: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    given = {k: v for k, v in verdicts.items() if v and v["verdict"]}
    fails = [v["reason"] for v in given.values() if v["verdict"] == "fail"]
    warns = [v["reason"] for v in given.values() if v["verdict"] == "warn"]
    by_why: dict[str, list[str]] = {}
    for v in verdicts.values():
        if v and not v["verdict"]:
            by_why.setdefault(v["why"], []).append(v["label"])
    unjudged = [label for labels in by_why.values() for label in labels]
    tail = "".join(f" Not judged ({why}): {'; '.join(labels)}." for why, labels in by_why.items())
    if not given:
        why = f"{UNJUDGED} on any headline metric" if UNJUDGED in by_why else "no headline metric could be computed"
        return {"verdict": "warn", "sentence": f"Not judged: {why}.{tail}", "reasons": [], "unjudged": unjudged}
    if fails:
        also = f" Also measurably worse (warn): {'; '.join(warns)}." if warns else ""
        return {"verdict": "fail", "reasons": fails + warns, "unjudged": unjudged,
                "sentence": f"Not fit for use: {len(fails)} headline metric(s) fail against real data — "
                            + "; ".join(fails) + "." + also + tail}
    if warns:
        return {"verdict": "warn", "reasons": warns, "unjudged": unjudged,
                "sentence": "Fit for use with care: measurably worse than real data on " + "; ".join(warns) + "."
                            + tail}
    if unjudged:
        return {"verdict": "warn", "reasons": [], "unjudged": unjudged,
                "sentence": f"Judged in part: none of the {len(given)} judged headline metrics is worse than real data "
                            "beyond sampling noise and its warn margin, but not every metric could be judged." + tail}
    return {"verdict": "pass", "reasons": [], "unjudged": [],
            "sentence": f"Fit for use: none of the {len(given)} headline metrics is worse than real data scored "
                        "the same way (same n, same reference) beyond sampling noise and its warn margin."}
