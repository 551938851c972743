"""The report's summary: the headline numbers (each beside its real baseline) and the per-class
table, shared by report.json, the HTML page, the CLI and the Prefect artifacts."""

from __future__ import annotations

import math
from typing import Any


from meddiff.evaluate.matched import mean_difference
from meddiff.evaluate.verdicts import AT_CHANCE, UNJUDGED, judge, judge_tstr

# headline metric → (metric, extractor or None = the distribution extractor, reference)
HEADLINE = {
    "kid": ("kid", None, "heldout"), "kid_train": ("kid", None, "train"),
    "fid": ("fid", None, "heldout"),
    "precision": ("precision", None, "heldout"), "recall": ("recall", None, "heldout"),
    "coverage": ("coverage", None, "heldout"),
    "closer_to_train": ("closer_to_train", "domain", None),
    "label_fidelity": ("label_fidelity", "domain", None),
    "flagged_fraction": ("flagged_fraction", "domain+pixel", None),
    "intra_class_ssim": ("intra_class_ssim", "pixel", None),
    "ssim_to_nearest_train": ("ssim_to_nearest_train", "pixel", None),
}
LABELS = {"kid": "KID vs held-out (n-robust)", "kid_train": "KID vs train", "fid": "FID vs held-out (n-dependent)",
          "precision": "precision", "recall": "recall", "coverage": "coverage",
          "closer_to_train": "closer to train than held-out", "label_fidelity": "label fidelity",
          "flagged_fraction": "flagged (memorization)",
          "intra_class_ssim": "intra-class SSIM, n pairs (↓ = diverse; target: real)",
          "ssim_to_nearest_train": "SSIM to nearest train", "tstr_accuracy": "TSTR accuracy (vs real at equal n)"}


def _find(metrics: list[dict[str, Any]], metric: str, extractor: str | None, reference: str | None,
          scope: str = "overall"):
    for r in metrics:
        if r["metric"] == metric and r["scope"] == scope and (extractor is None or r["extractor"] == extractor) \
                and (reference is None or r.get("reference") == reference):
            return r
    return None


def make_headline(metrics: list[dict[str, Any]], tstr: dict[str, Any] | None,
                  features: tuple[str, ...]) -> dict[str, Any]:
    """The few numbers a reader looks at first, each with its matched baseline, interval and verdict."""
    ext = "inception" if "inception" in features else features[0]
    out: dict[str, Any] = {}
    for key, (metric, extractor, reference) in HEADLINE.items():
        r = _find(metrics, metric, extractor or ext, reference)
        out[key] = _pick(r, key)
    if tstr:
        acc = {s["setting"]: s for s in tstr["settings"]}
        # like with like: real training images at the synthetic set's n and class mix (reports before
        # schema 3 have only the whole real split)
        syn, real = acc.get("synthetic"), acc.get("real (equal size)") or acc.get("real")
        if syn and real:
            out["tstr_accuracy"] = {"value": syn["accuracy"], "baseline": real["accuracy"], "n": syn["n_train"],
                                    "baseline_n": real["n_train"], "n_test": syn["n_test"],
                                    "ci": syn.get("ci"), "baseline_ci": real.get("ci"), "reference": "real test",
                                    "extractor": tstr["model"], "difference": None,
                                    "real_all": (acc.get("real") or {}).get("accuracy"),
                                    "majority_accuracy": tstr.get("majority_accuracy"),
                                    "real+synthetic": (acc.get("real+synthetic") or {}).get("accuracy"),
                                    "verdict": judge_tstr(syn["accuracy"], real["accuracy"],
                                                          mean_difference(syn["accuracy"], syn.get("ci"),
                                                                          real["accuracy"], real.get("ci"),
                                                                          span=1.0)["ci"],
                                                          real.get("ci"), tstr.get("majority_accuracy"))}
    return out


def small_sample(headline: dict[str, Any], reliable_n: int) -> dict[str, Any] | None:
    """{"metrics", "n", "reliable_n"}: the judged headline set metrics computed on fewer than ``reliable_n``
    images per side (each carries the small-n warning); None when there are none."""
    small = {k: v["n"] for k, v in headline.items() if isinstance(v, dict) and (v.get("verdict") or {}).get("verdict")
             and v.get("warning") and v.get("n") is not None and v["n"] < reliable_n}
    if not small:
        return None
    return {"metrics": [{"kid": "KID"}.get(k, k.replace("_", " ")) for k in small], "n": min(small.values()),
            "reliable_n": reliable_n}


def _pick(r: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    if r is None:
        return None
    b = r.get("baseline") or {}
    diff = r.get("difference") or {}
    verdict = None if key in ("fid", "kid_train", "ssim_to_nearest_train") else \
        judge(r["metric"], r["value"], b.get("value"), diff.get("ci"), b.get("ci"))
    return {"value": r["value"], "baseline": b.get("value"), "n": r["n"], "baseline_n": b.get("n"),
            "ci": r["ci"], "baseline_ci": b.get("ci"),
            "difference": diff.get("value"), "difference_ci": diff.get("ci"), "reference": r.get("reference"),
            "extractor": r["extractor"], "warning": r.get("warning"), "verdict": verdict,
            **({"unit": r["unit"]} if r.get("unit") else {})}  # n counts pairs of images (intra-class SSIM)


def _verdict_cell(v: dict[str, Any] | None) -> str:
    """pass / warn / fail; "no CI" when the metric has a rule but too few images for an interval; "at chance"
    when TSTR's real baseline does not beat the commonest class; "—" when it has no rule or was not computed."""
    if not v:
        return "—"
    return v["verdict"] or {UNJUDGED: "no CI", AT_CHANCE: "at chance"}.get(v.get("why"), "—")


def with_ci(v: Any, ci: list[float] | None = None, sep: str = " ") -> str:
    """'0.2418 [0.226, 0.257]': a value (4 significant digits) and its interval (3); '—' for none."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    s = f"{v:.4g}" if isinstance(v, float) else str(v)
    return s + (f"{sep}[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def headline_rows(report: dict[str, Any], ci_sep: str = " ") -> list[tuple[str, str, str, str, str]]:
    """(name, synthetic [CI], real baseline [CI], n, verdict) strings for the CLI, HTML and flow tables;
    ``ci_sep`` goes between a value and its interval (``"\n"``: the interval on a line of its own)."""
    h = report["headline"]

    def fmt(v: Any, ci: list[float] | None = None) -> str:
        return with_ci(v, ci, ci_sep)

    rows = []
    for key, label in LABELS.items():
        r = h.get(key)
        if not r:
            continue
        ext = f" ({r['extractor']})" if key in ("kid", "kid_train", "fid", "precision", "recall", "coverage") else ""
        rows.append((label + ext, fmt(r["value"], r.get("ci")), fmt(r["baseline"], r.get("baseline_ci")),
                     str(r.get("n") or "—"), _verdict_cell(r.get("verdict"))))
    return rows


def per_class_cells(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per class: ``class``, ``images`` (in the cohort), ``set n`` (the matched n of its set
    metrics, against the held-out split) and, per main metric, (synthetic, real baseline)."""
    ext = report["headline"]["kid"]["extractor"] if report["headline"].get("kid") else None
    rows: dict[str, dict[str, Any]] = {}
    for r in report["metrics"]:
        if r["scope"] == "overall" or r.get("reference") == "train":
            continue
        key = r["metric"] if r["extractor"] in ("pixel", "domain+pixel") or r["metric"] == "label_fidelity" \
            else f"{r['metric']} ({r['extractor']})"
        if r["extractor"] not in (ext, "pixel", "domain+pixel") and r["metric"] != "label_fidelity" \
                and r["metric"] not in ("kid",):
            continue
        row = rows.setdefault(r["scope"], {"class": r["scope"], "images": report["cohort"]["counts"].get(r["scope"]),
                                           "set n": None})
        if r.get("reference") == "heldout" and r["extractor"] == ext:
            row["set n"] = r["n"]
        base = (r.get("baseline") or {}).get("value")
        row[key] = tuple(None if v is None else round(float(v), 4) for v in (r["value"], base))
    return list(rows.values())


def per_class_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per class: the main metrics (synthetic value), for tables and artifacts."""
    return [{k: v[0] if isinstance(v, tuple) else v for k, v in row.items()} for row in per_class_cells(report)]
