"""The evaluation report as ONE self-contained HTML file (matplotlib PNGs embedded as base64).

Sections (element ids): summary, samples, reverse-diffusion, umap, metrics, memorization, tstr, loss-curve, notes.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

import numpy as np

from meddiff import storage
from meddiff.evaluate.summary import headline_rows, per_class_cells
from meddiff.figures import to_png

SECTIONS = ("summary", "samples", "reverse-diffusion", "umap", "metrics", "memorization", "tstr", "loss-curve", "notes")
CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.warn{color:#a60}.base{color:#666}.verdict{font-size:16px;padding:.5em;border-radius:4px}.pass{background:#e6f4e6}
.fail{background:#f8e0e0}.flag{color:#b00;font-weight:bold}
img{max-width:100%}code{background:#f5f5f5;padding:0 3px}"""


def _png(fig) -> str:
    data = to_png(fig, tight=False, dpi=100, bbox_inches="tight")  # meddiff.figures: one drawing thread at a time
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _hwc(img: np.ndarray) -> np.ndarray:
    """uint8 C×H×W → H×W×3 for display."""
    img = img.transpose(1, 2, 0)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _mosaic(rows: list[list[np.ndarray]], size: int, ncol: int, pad: int = 2) -> np.ndarray:
    """Rows of uint8 C×H×W images → one H×W×3 mosaic of ``ncol`` columns (empty cells stay white)."""
    out = np.full((len(rows) * (size + pad) + pad, ncol * (size + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (size + pad), pad + j * (size + pad)
            out[y:y + size, x:x + size] = _hwc(img)
    return out


def _short(name: str, n: int = 28) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def sample_grid(syn, train, class_names: list[str], per_class: int) -> str:
    """Per class: ``per_class`` synthetic images (left) beside as many real training images (right)."""
    from matplotlib.figure import Figure

    classes = [c for c in range(len(class_names)) if (syn.y == c).any()]
    size = syn.x.shape[-1]
    fig = Figure(figsize=(2 * per_class * 0.45 + 2, len(classes) * 0.5 + 0.8))
    axes = fig.subplots(1, 2, squeeze=True)
    for ax, imgs, title in ((axes[0], syn, "synthetic"), (axes[1], train, "real (train)")):
        rows = [[imgs.x[i] for i in np.flatnonzero(imgs.y == c)[:per_class]] for c in classes]
        ax.imshow(_mosaic(rows, size, per_class), interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([(size + 2) * (i + 0.5) + 1 for i in range(len(classes))])
        ax.set_yticklabels([_short(class_names[c]) for c in classes] if ax is axes[0] else [])
    return _png(fig)


def pairs_figure(syn, train, nn_syn, order: np.ndarray, pairs: list[dict[str, Any]]) -> str:
    """Closest synthetic (top) / training (bottom) pairs, captioned with their pixel RMSE."""
    from matplotlib.figure import Figure

    n = len(order)
    fig = Figure(figsize=(max(n, 1) * 1.1, 2.6))
    axes = fig.subplots(2, max(n, 1), squeeze=False)
    for j, (i, p) in enumerate(zip(order, pairs)):
        j_ref = int(nn_syn[i])
        ref_img = train.x[j_ref % len(train.x)][..., ::-1] if j_ref >= len(train.x) else train.x[j_ref]
        for r, img in enumerate((syn.x[i], ref_img)):
            ax = axes[r][j]
            ax.imshow(_hwc(img), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(f"#{p.get('sample_id', p['index'])}{' ⚑' if p['flagged'] else ''}\n{p['pixel_rmse']:.3f}", fontsize=7,
                             color="red" if p["flagged"] else "black")
    axes[0][0].set_ylabel("synthetic", fontsize=8)
    axes[1][0].set_ylabel("nearest train", fontsize=8)
    return _png(fig)


def loss_curve(model_uri: str | None) -> str:
    """The model's loss curve: a plot of ``metrics.jsonl`` (keys containing "loss" against step), or a
    loss-curve PNG from the model folder; a note when neither exists."""
    if not model_uri:
        return "<p>No model URI in cohort.json: no loss curve.</p>"
    try:
        names = storage.listdir(model_uri)
    except Exception as e:  # noqa: BLE001 - the report still renders without it
        return f"<p>Model folder {html.escape(model_uri)} unreadable ({html.escape(str(e))}).</p>"
    logs = (["metrics.jsonl"] if "metrics.jsonl" in names else
            [f"{n}/metrics.jsonl" for n in names if n.startswith("class-")
             and storage.exists(storage.join(model_uri, n, "metrics.jsonl"))])  # per-class model groups
    series = {log: _loss_series(storage.read_bytes(storage.join(model_uri, log)).decode()) for log in logs}
    series = {log: s for log, s in series.items() if s}
    if series:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 3.2))
        ax = fig.subplots()
        positive = True
        for log, (xkey, curves) in series.items():
            prefix = "" if log == "metrics.jsonl" else log.split("/")[0] + " "
            for k, pts in curves.items():
                # markers where points are few: a val loss logged at one checkpoint is one point, no line
                ax.plot(*zip(*pts), label=prefix + k, lw=1, marker="o" if len(pts) <= 30 else None, ms=3)
                positive &= all(v > 0 for _, v in pts)
            ax.set_xlabel(xkey or "record")
        ax.set_yscale("log" if positive else "linear")
        ax.legend(fontsize=7)
        return f"<p>From <code>{html.escape(', '.join(series))}</code> in the model folder.</p>" + _png(fig)
    pngs = [n for n in names if n.lower().endswith(".png") and ("loss" in n.lower() or "curve" in n.lower())]
    if pngs:
        data = storage.read_bytes(storage.join(model_uri, pngs[0]))
        return (f"<p>From <code>{html.escape(pngs[0])}</code>.</p>"
                f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}">')
    return f"<p>No metrics.jsonl or loss-curve PNG in {html.escape(model_uri)}.</p>"


def _loss_series(text: str) -> tuple[str | None, dict[str, list[tuple[float, float]]]] | None:
    """metrics.jsonl text → (x key, {loss key: [(x, value)]}); None when it has no loss values."""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    rows = [r for r in rows if isinstance(r, dict)]
    keys = sorted({k for r in rows for k, v in r.items() if "loss" in k.lower() and isinstance(v, (int, float))})
    if not keys:
        return None
    xkey = next((k for k in ("step", "global_step", "iteration", "epoch") if any(k in r for r in rows)), None)
    return xkey, {k: [(r.get(xkey, i) if xkey else i, r[k]) for i, r in enumerate(rows)
                      if isinstance(r.get(k), (int, float))] for k in keys}


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _facts(v: Any, sep: str = "; ") -> str:
    """A record as prose, not JSON: {"dim": 2048, "images": {"syn": 280, "val": 40}}
    → "dim 2048; images: syn 280, val 40"."""
    if not isinstance(v, dict):
        return str(v)
    return sep.join(f"{str(k).replace('_', ' ')}{':' if isinstance(x, dict) else ''} {_facts(x, ', ')}"
                    for k, x in v.items())


def _pair(v: Any) -> str:
    """A per-class cell: "synthetic (baseline)" for a (value, baseline) pair."""
    if not isinstance(v, tuple):
        return _fmt(v)
    return _fmt(v[0]) + ("" if v[1] is None else f" <span class='base'>({_fmt(v[1])})</span>")


def _ci(ci: list[float] | None) -> str:
    return f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h.replace('_', ' '))}</th>" for h in header)  # spaces: long names wrap
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _all_metrics_table(metrics: list[dict[str, Any]]) -> list[str]:
    """Every metric record; its warning or note as a numbered footnote, each distinct text listed once below
    (the per-class rows of a dataset share one small-sample warning: in every cell it tripled the table)."""
    texts = [r.get("warning") or r.get("note") or "" for r in metrics]
    number = {t: i + 1 for i, t in enumerate(dict.fromkeys(t for t in texts if t))}
    rows = [[r["metric"], r["extractor"], html.escape(str(r.get("reference", "-"))), html.escape(r["scope"]),
             _fmt(r["value"]) + _ci(r["ci"]), _fmt(r["n"]), _fmt(r.get("n_ref")),
             (_fmt(r["baseline"]["value"]) + _ci(r["baseline"]["ci"])) if r.get("baseline") else "—",
             (_fmt((r.get("difference") or {}).get("value")) + _ci((r.get("difference") or {}).get("ci"))),
             f"<span class='warn'>[{number[t]}]</span>" if t else ""] for r, t in zip(metrics, texts)]
    notes = "".join(f"<li class='warn'>{html.escape(t)}</li>" for t in number)
    return [_table(["metric", "extractor", "reference", "scope", "synthetic [CI]", "n", "n ref", "baseline [CI]",
                    "difference [CI]", "warning"], rows), f"<ol>{notes}</ol>" if notes else ""]


def _memorization_section(m: dict[str, Any], syn, train, nn_syn, order: np.ndarray) -> list[str]:
    parts: list[str] = []
    parts += ['<h2 id="memorization">Memorization</h2>',
              f"<p>Mirrored training images count as copies: {m.get('mirror_copies')}. Nearest training image of every synthetic image in {m['feature_extractor']} feature space and "
              f"pixel space ({m['pixel_distance']}). Flag rule <code>{m['rule']}</code>: closer than the "
              f"{html.escape(m['threshold_source'])} — feature ≤ {m['thresholds']['feature']:.4g}, "
              f"pixel ≤ {m['thresholds']['pixel']:.4g}. <span class='flag'>{m['flagged']} of {m['n']} flagged.</span></p>",
              _table(["class", "flagged"], [[html.escape(k), str(v)] for k, v in m["flagged_by_class"].items()]),
              "<h3>Closest pairs (flagged first)</h3>",
              pairs_figure(syn, train, nn_syn, order, m["closest_pairs"]) if m["closest_pairs"] else "",
              _table(["sample", "class", "train key", "mirrored", "pixel RMSE", "feature dist", "flagged"],
                     [[str(p.get("sample_id", p["index"])), html.escape(p["class_name"]), html.escape(p["real_key"]),
                       "yes" if p["mirrored"] else "no", f"{p['pixel_rmse']:.4f}", f"{p['feature_distance']:.4g}",
                       "<span class='flag'>yes</span>" if p["flagged"] else "no"] for p in m["closest_pairs"]])]
    return parts


def _reverse_diffusion_section(cohort_uri: str) -> list[str]:
    """The cohort's progressive-generation GIF (generate/pictures.py: noise → image, a few classes)."""
    out = ['<h2 id="reverse-diffusion">Progressive generation</h2>']
    gif = storage.join(cohort_uri, "reverse_diffusion.gif")
    if not storage.exists(gif):
        return out + ["<p>No reverse_diffusion.gif in the cohort folder (made by <code>meddiff generate</code>).</p>"]
    strip = storage.join(cohort_uri, "reverse_diffusion.png")  # every step at once: what a printout shows
    imgs = [f'<img src="data:image/png;base64,{base64.b64encode(storage.read_bytes(strip)).decode()}">'
            ] if storage.exists(strip) else []
    return out + ["<p>The first image of a few classes regenerated with its trajectory recorded, noise to image "
                  "(latent models: latent | decoded): one row per image, steps from left to right, and the same "
                  "as an animation.</p>",
                  "<p>" + " ".join(imgs + [f'<img src="data:image/gif;base64,'
                                           f'{base64.b64encode(storage.read_bytes(gif)).decode()}">']) + "</p>"]


def _umap_section(rec: dict[str, Any], png: bytes | None) -> list[str]:
    out = ['<h2 id="umap">Feature map: real vs synthetic (UMAP)</h2>']
    if png is None:
        return out + [f"<p>Not drawn: {html.escape(str(rec.get('skipped', 'no UMAP in this report')))}.</p>"]
    return out + [f"<p>One UMAP (McInnes et al. 2018) of the domain classifier's features, fitted on "
                  f"{rec.get('n_real')} real images of the {html.escape(str(rec.get('real')))} (grey) and "
                  f"{rec.get('n_synthetic')} synthetic ones (colour) together, drawn per class. Overlapping clouds: "
                  f"the cohort covers that class's real images; a synthetic cloud off to one side or shrunk to a "
                  f"point is what precision, recall and coverage summarise. Distances on a UMAP are not metric: "
                  f"read it as a picture, the numbers are in the tables.</p>",
                  f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}">']


def _tstr_section(t: dict[str, Any] | None) -> list[str]:
    parts: list[str] = []
    parts.append('<h2 id="tstr">Utility: train on synthetic, test on real (TSTR)</h2>')
    if t:
        floor = t.get("majority_accuracy")
        parts += [f"<p>{html.escape(t['model'])}, {t['steps']} optimizer steps for every setting, checkpoint "
                  f"chosen on the real val split, tested on the {t['test_split']} split"
                  f"{'; flagged images excluded' if t['synthetic_excludes_flagged'] else ''}. "
                  + ("The synthetic set is judged against <b>real (equal size)</b>: real training images with its "
                     "n and class mix; <i>real</i> (the whole split) is the ceiling. "
                     if t.get("baseline") else "")
                  + (f"Always predicting the commonest test class scores {_fmt(floor)}: accuracy at or below it "
                     f"means the classifier learned nothing." if floor is not None else "") + "</p>",
                  _table(["trained on", "N train", "N test", "accuracy", "macro AUC"],
                         [[s["setting"], str(s["n_train"]), str(s["n_test"]), _fmt(s["accuracy"]) + _ci(s.get("ci")),
                           _fmt(s["auc"])]
                          for s in t["settings"]])]
    else:
        parts.append("<p>Not run (enable with <code>--tstr</code>).</p>")
    return parts


def render_html(report: dict[str, Any], syn, train, nn_syn, order: np.ndarray, class_names: list[str],
                per_class: int, model_uri: str | None, umap_png: bytes | None = None) -> bytes:

    inp = report["inputs"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>meddiff evaluation</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>Synthetic cohort evaluation</h1>",
             _table(["", ""], [["cohort", f"<code>{html.escape(inp['cohort_uri'])}</code>"],
                               ["real dataset", f"<code>{html.escape(inp['dataset_uri'])}</code>"],
                               *([["real splits", html.escape(report["real_splits"])]]
                                 if report.get("real_splits") else []),  # patient-disjoint or not
                               ["model", f"<code>{html.escape(str(inp['model_uri']))}</code>"],
                               ["images", str(report["cohort"]["n"])], ["created", report["created_at"]],
                               ["report schema", str(report["report_schema_version"])],
                               ["flagged images dropped for consumers", str(report["drop_flagged"])]])]
    v = report["verdict"]
    parts.insert(2, f"<p class='verdict {v['verdict']}'><b>{html.escape(v['sentence'])}</b></p>")
    parts += ['<h2 id="summary">Summary</h2>',
              "<p>Every number is shown beside its real baseline: real validation images (never seen by the "
              "generator) scored exactly like the cohort — set metrics at the same n against the same reference "
              "subsample" + (", baseline and reference drawn with the cohort's class mix"
                             if "class mix" in str(report.get("baseline")) else "")
              + ". Held-out reference: the real test split; train reference: the generator's training "
              "split. Verdict: pass = not worse than real data beyond sampling noise and the metric's warn margin "
              "(the reason says within noise, within the margin, or better); warn = measurably worse; fail = "
              "materially worse beyond the 95 % interval; intra-class SSIM is judged both ways (real's is the "
              "target: far below it is noise-like, not diverse); no CI = too few images for an interval, not judged; "
              "at chance (TSTR) = real images at this n classify no better than always predicting the commonest "
              "class, not judged. "
              "KID is n-robust; FID depends on n. Under 250 images per side set metrics are unreliable: "
              "the verdict sentence says so.</p>",
              _table(["metric", "synthetic [95 % CI]", "real baseline [95 % CI]", "n", "verdict"],
                     [[html.escape(c) for c in row] for row in headline_rows(report)])]
    parts += ['<h2 id="samples">Samples per class</h2>']
    if report.get("labels", "").startswith("oracle"):
        parts.append("<p><b>Unconditional cohort:</b> no class was asked for; images are grouped by the class the "
                     "domain classifier predicts, and label fidelity and TSTR are not computed.</p>")
    parts += [sample_grid(syn, train, class_names, per_class)]
    if report.get("class_mix"):
        parts += ["<h3>Class mix</h3><p>Each class's share of the cohort (by "
                  f"{'the oracle' if report.get('labels', '').startswith('oracle') else 'intended class'}) beside "
                  "its share of the real training split.</p>",
                  _table(["class", "synthetic share", "real train share"],
                         [[html.escape(r["class"]), _fmt(r["synthetic"]), _fmt(r["real_train"])]
                          for r in report["class_mix"]])]
    parts += _reverse_diffusion_section(report["inputs"]["cohort_uri"])
    parts += _umap_section(report.get("umap") or {}, umap_png)

    pc = per_class_cells(report)
    cols = list(dict.fromkeys(k for r in pc for k in r))
    parts += ['<h2 id="metrics">Metrics per class</h2>',
              "<p>Each cell: the class's synthetic images (in parentheses, its real baseline: real validation images "
              "scored the same way; intra-class SSIM: pairs of real training images). Set metrics (FID … "
              "coverage) against the held-out split at <i>set n</i> images per side; at small n read them with "
              "their intervals in the table below.</p>",
              _table(cols, [[_pair(r.get(c)) for c in cols] for r in pc]),
              "<h3>All metrics</h3><p>Set metrics: 95 % half-sampling intervals (100+ subsamples without "
              "replacement, see bootstrap.py); means: Wilson / normal intervals. Intra-class SSIM baseline: pairs "
              "of real training images of the same class.</p>",
              *_all_metrics_table(report["metrics"])]
    parts += _memorization_section(report["memorization"], syn, train, nn_syn, order)
    parts += _tstr_section(report.get("tstr"))
    parts += ['<h2 id="loss-curve">Model loss curve</h2>', loss_curve(model_uri)]
    notes = [f"MS-SSIM: {html.escape(report['ms_ssim'].get('reason', 'computed'))}"]
    notes += [f"Extractor <b>{html.escape(k)}</b>: {html.escape(_facts(v))}" for k, v in report["extractors"].items()]
    notes += [f"<span class='warn'>{html.escape(w)}</span>" for w in report["warnings"]]
    parts += ['<h2 id="notes">Notes and warnings</h2><ul>', *[f"<li>{n}</li>" for n in notes], "</ul></body></html>"]
    return "\n".join(parts).encode()
