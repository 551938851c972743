"""The report's summary: the headline numbers (each beside its real baseline) and the per-class
table, shared by report.json, the HTML page, the CLI and the Prefect artifacts."""

from __future__ import annotations

import math
from typing import Any


def _find(metrics: list[dict[str, Any]], metric: str, extractor: str | None, scope: str = "overall"):
    for r in metrics:
        if r["metric"] == metric and r["scope"] == scope and (extractor is None or r["extractor"] == extractor):
            return r
    return None


def make_headline(metrics: list[dict[str, Any]], memo: dict[str, Any], tstr: dict[str, Any] | None,
                  features: tuple[str, ...]) -> dict[str, Any]:
    """The few numbers a reader looks at first, each with its real-vs-real baseline."""
    ext = "inception" if "inception" in features else features[0]
    fid = _find(metrics, "fid", ext)
    per_class = {r["scope"]: r["value"] for r in metrics
                 if r["metric"] == "fid" and r["extractor"] == ext and r["scope"] != "overall" and r["value"] is not None}
    lf = _find(metrics, "label_fidelity", "domain")
    fl = _find(metrics, "flagged_fraction", None)
    out: dict[str, Any] = {
        "fid": {"extractor": ext, "value": fid["value"], "baseline": (fid["baseline"] or {}).get("value"),
                "n": fid["n"]} if fid else None,
        "fid_per_class_range": ({"min": min(per_class.values()), "max": max(per_class.values()),
                                 "min_class": min(per_class, key=per_class.get),
                                 "max_class": max(per_class, key=per_class.get)} if per_class else None),
        "precision": _pick(_find(metrics, "precision", ext)), "recall": _pick(_find(metrics, "recall", ext)),
        "label_fidelity": _pick(lf), "flagged_fraction": _pick(fl),
        "ssim_to_nearest_train": _pick(_find(metrics, "ssim_to_nearest_train", "pixel")),
        "intra_class_ssim": _pick(_find(metrics, "intra_class_ssim", "pixel")),
    }
    if tstr:
        acc = {s["setting"]: s["accuracy"] for s in tstr["settings"]}
        out["tstr_accuracy"] = {"synthetic": acc.get("synthetic"), "real": acc.get("real"),
                                "real+synthetic": acc.get("real+synthetic")}
    return out


def _pick(r: dict[str, Any] | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {"value": r["value"], "baseline": (r.get("baseline") or {}).get("value"), "n": r["n"], "ci": r["ci"]}


def headline_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, synthetic, real baseline) strings for the CLI table and the flow's markdown."""
    h = report["headline"]

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "—"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = []
    if h.get("fid"):
        rows.append((f"FID ({h['fid']['extractor']})", fmt(h["fid"]["value"]), fmt(h["fid"]["baseline"])))
    if h.get("fid_per_class_range"):
        r = h["fid_per_class_range"]
        rows.append(("FID per class (min–max)", f"{fmt(r['min'])} ({r['min_class']}) – {fmt(r['max'])} ({r['max_class']})", ""))
    for key, label in (("precision", "precision"), ("recall", "recall"), ("label_fidelity", "label fidelity"),
                       ("flagged_fraction", "flagged (memorization)"), ("ssim_to_nearest_train", "SSIM to nearest train"),
                       ("intra_class_ssim", "intra-class SSIM (↓ = diverse)")):
        if h.get(key):
            rows.append((label, fmt(h[key]["value"]), fmt(h[key]["baseline"])))
    if h.get("tstr_accuracy"):
        t = h["tstr_accuracy"]
        rows.append(("TSTR accuracy (synthetic / real+syn)", f"{fmt(t['synthetic'])} / {fmt(t['real+synthetic'])}",
                     fmt(t["real"])))
    return rows


def per_class_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per class: the main metrics (synthetic value), for tables and artifacts."""
    ext = report["headline"]["fid"]["extractor"] if report["headline"].get("fid") else None
    rows: dict[str, dict[str, Any]] = {}
    for r in report["metrics"]:
        if r["scope"] == "overall":
            continue
        key = r["metric"] if r["extractor"] in ("pixel", "domain+pixel") or r["metric"] == "label_fidelity" \
            else f"{r['metric']} ({r['extractor']})"
        if r["extractor"] not in (ext, "pixel", "domain+pixel") and r["metric"] != "label_fidelity" \
                and r["metric"] not in ("fid",):
            continue
        rows.setdefault(r["scope"], {"class": r["scope"], "n": report["cohort"]["counts"].get(r["scope"])})
        rows[r["scope"]][key] = None if r["value"] is None else round(float(r["value"]), 4)
    return list(rows.values())

