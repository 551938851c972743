"""Ablation sweeps: train one model per combination of a grid of training settings, judge every model
with the same protocol, and write a comparison table naming the best combination.

Protocol per combination (like with like: every model generates ``per_class`` images of every
class and is compared with the same real splits, so the rows share their n; the real val-vs-train
baseline has the val split's n, and KID, unbiased in n, is the default ranking): train
(content-addressed, so finished runs are reused), generate a cohort (also reused), evaluate it
with the domain extractor (KID, FID, label fidelity, SSIM to the nearest training image,
intra-class SSIM, each beside the same real baseline) and, for DDPM models, bits/dim on the real test split (``meddiff.models.likelihood``).
``<root>/sweeps/<dataset>-<hash>/`` holds ``sweep.parquet``, ``sweep.html`` and, last, ``sweep.json``.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args

from meddiff import storage
from meddiff.errors import MeddiffError, check_seed
from meddiff.progress import Progress, tell, told_as
from meddiff.records import content_hash, make_record

RankBy = Literal["kid", "fid", "bits_per_dim", "label_fidelity"]
HIGHER_IS_BETTER = {"label_fidelity"}
# grid knob → TrainConfig field (and how a value string becomes the field's value)
KNOBS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "schedule": ("schedule", str), "attention": ("attention_levels", str), "objective": ("objective", str),
    "prediction": ("prediction", str), "min_snr_gamma": ("min_snr_gamma", float), "lr": ("lr", float),
    "steps": ("steps", int), "batch_size": ("batch_size", int), "preset": ("preset", str), "mode": ("mode", str),
    "channels": ("network_channels", lambda v: tuple(int(c) for c in v.split("-"))),  # "16-32" → (16, 32)
}
# a valid value of each numeric knob, shown when a --grid value does not parse
GRID_EXAMPLES = {"min_snr_gamma": "5", "lr": "2e-4", "steps": "2000", "batch_size": "64", "channels": "16-32"}


def parse_grid(items: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """["schedule=linear,cosine", "attention=none,coarse"] → (("schedule", ("linear", "cosine")), ...)."""
    grid = []
    for item in items:
        name, _, values = item.partition("=")
        name = name.strip().replace("-", "_")
        vals = tuple(v.strip() for v in values.split(",") if v.strip())
        if name not in KNOBS or not vals:
            raise MeddiffError(f"--grid {item!r}: give KNOB=v1,v2 with KNOB one of {', '.join(KNOBS)} "
                               "(channels values as 16-32-64)")
        for v in vals:  # a typo fails here, not as a traceback after the first combinations trained
            try:
                KNOBS[name][1](v)
            except ValueError:
                raise MeddiffError(f"--grid {item!r}: {v!r} is not a valid {name} value "
                                   f"(e.g. {GRID_EXAMPLES[name]})") from None
        grid.append((name, vals))
    if len({n for n, _ in grid}) != len(grid):
        raise MeddiffError("--grid names a knob twice; put all its values in one --grid")
    return tuple(grid)


@dataclass(frozen=True)
class SweepConfig:
    dataset_uri: str  # the dataset version every combination trains on
    grid: tuple[tuple[str, tuple[str, ...]], ...]  # (knob, values) pairs; the sweep is their product
    base: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields shared by every run (preset, steps, ...)
    per_class: int = 50  # images generated per class by every model (matched n)
    sample_steps: int = 25  # sampler steps of generation (the model's own sampler)
    likelihood_images: int = 200  # test images for bits/dim (DDPM models); 0 = skip the likelihood
    likelihood_timesteps: int = 50  # stratified KL timesteps per image (unbiased estimate)
    rank_by: RankBy = "kid"  # the metric naming the best combination (KID/FID in domain features)
    device: str = "auto"  # auto | cpu | cuda[:N]
    seed: int = 0  # training, generation and evaluation seed

    def check(self) -> "SweepConfig":
        check_seed(self.seed)
        if not self.grid:
            raise MeddiffError("a sweep needs at least one --grid KNOB=v1,v2")
        if self.rank_by not in get_args(RankBy):
            raise MeddiffError(f"--rank-by must be one of {get_args(RankBy)}, not {self.rank_by!r}")
        if self.per_class < 2 or self.sample_steps < 1 or self.likelihood_images < 0:
            raise MeddiffError("--per-class must be ≥ 2, --sample-steps ≥ 1, --likelihood-images ≥ 0")
        combos = combinations(self)
        runs = [train_config(self, combo).check() for combo in combos]  # every run is valid before one trains
        for i, run in enumerate(runs):  # "lr=1e-3,0.001" would train once and rank the run against itself
            if run in runs[:i]:
                raise MeddiffError(f"--grid: {combo_label(combos[runs.index(run)], list(combos[i]))} and "
                                   f"{combo_label(combos[i], list(combos[i]))} are the same training run; "
                                   "give each knob distinct values")
        if self.rank_by == "bits_per_dim" and not (self.likelihood_images
                                                   and any(r.objective == "ddpm" for r in runs)):
            raise MeddiffError("--rank-by bits_per_dim needs --likelihood-images > 0 and at least one "
                               "ddpm run (rflow models have no bits/dim); rank by kid, fid or label_fidelity")
        return self


def combinations(cfg: SweepConfig) -> list[dict[str, str]]:
    """Every combination of the grid's values, knob → value string, in grid order."""
    names = [n for n, _ in cfg.grid]
    return [dict(zip(names, vals)) for vals in itertools.product(*(v for _, v in cfg.grid))]


def train_config(cfg: SweepConfig, combo: dict[str, str]):
    """The TrainConfig of one combination."""
    from meddiff.train.config import TrainConfig

    over = {KNOBS[k][0]: KNOBS[k][1](v) for k, v in combo.items()}
    return TrainConfig(cfg.dataset_uri, **{"device": cfg.device, "seed": cfg.seed, **cfg.base, **over})


def _metric(report: dict[str, Any], metric: str, extractor: str) -> dict[str, Any] | None:
    for r in report["metrics"]:
        if r["metric"] == metric and r["extractor"] == extractor and r["scope"] == "overall":
            return r
    return None


def report_row(report: dict[str, Any]) -> dict[str, Any]:
    """The evaluation numbers of one combination (synthetic value, CI and real baseline)."""
    row: dict[str, Any] = {}
    for metric, ext in (("kid", "domain"), ("fid", "domain"), ("label_fidelity", "domain"),
                        ("ssim_to_nearest_train", "pixel"), ("intra_class_ssim", "pixel")):
        r = _metric(report, metric, ext) or {}
        row[metric] = r.get("value")
        row[f"{metric}_ci"] = r.get("ci")
        row[f"{metric}_baseline"] = (r.get("baseline") or {}).get("value")
    row["n_synthetic"] = report["cohort"]["n"]
    return row


def run_combination(cfg: SweepConfig, combo: dict[str, str], root: str | None = None,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Train (or reuse), generate (or reuse), evaluate and score one combination; returns its table row.
    ``progress`` follows each stage in turn, told which one starts."""
    from meddiff.evaluate import EvalConfig, evaluate_cohort
    from meddiff.generate import CohortSpec, generate
    from meddiff.models.likelihood import LikelihoodConfig, likelihood
    from meddiff.train import train

    tcfg = train_config(cfg, combo)
    tell(progress, "train")
    model = train(tcfg, root, progress)
    tell(progress, "generate")
    cohort = generate(CohortSpec(model.uri, per_class=cfg.per_class, steps=cfg.sample_steps, seed=cfg.seed,
                                 device=cfg.device), root, progress)
    tell(progress, "evaluate")
    ev = evaluate_cohort(cohort.uri, EvalConfig(features=("domain",), device=cfg.device, seed=cfg.seed), progress)
    row: dict[str, Any] = {**combo, "model_uri": model.uri, "cohort_uri": cohort.uri,
                           "objective": tcfg.objective, **report_row(ev.report)}
    row["bits_per_dim"] = row["bits_per_dim_ci"] = None
    if tcfg.objective == "ddpm" and cfg.likelihood_images:
        tell(progress, "likelihood")
        lk = likelihood(model.uri, cfg.dataset_uri, LikelihoodConfig(
            split="test", max_images=cfg.likelihood_images, timesteps=cfg.likelihood_timesteps,
            device=cfg.device, seed=cfg.seed), progress)
        row["bits_per_dim"], row["bits_per_dim_ci"] = lk["overall"]["bits_per_dim"], lk["overall"]["ci"]
    return row


def best_row(rows: list[dict[str, Any]], rank_by: str) -> int | None:
    """Index of the best row by ``rank_by`` (rows without that metric are not ranked)."""
    scored = [(r[rank_by], i) for i, r in enumerate(rows) if r.get(rank_by) is not None]
    if not scored:
        return None
    pick = max if rank_by in HIGHER_IS_BETTER else min
    return pick(scored)[1]


def not_separated(rows: list[dict[str, Any]], rank_by: str, best: int | None) -> list[int]:
    """Indices of the ranked rows the best one is not separated from at this n: their 95 % intervals of
    ``rank_by`` overlap the best's (or one of the two has no interval). Overlap is the conservative
    reading — two intervals clear of each other mean a real difference; overlapping ones do not show one."""
    if best is None:
        return []
    ci_best = rows[best].get(f"{rank_by}_ci")
    tied = []
    for i, r in enumerate(rows):
        if i == best or r.get(rank_by) is None:
            continue
        ci = r.get(f"{rank_by}_ci")
        if not ci or not ci_best or (ci[0] <= ci_best[1] and ci_best[0] <= ci[1]):
            tied.append(i)
    return tied


def combo_label(row: dict[str, Any], knobs: list[str]) -> str:
    """{"schedule": "cosine", "attention": "none"} → "schedule=cosine attention=none"."""
    return " ".join(f"{k}={row[k]}" for k in knobs)


def best_sentence(rec: dict[str, Any]) -> str:
    """What the ranking shows, in one sentence: the best combination and, honestly, the ones it is not
    separated from (works on records written before ``tied_with_best`` was recorded)."""
    rows, rank_by = rec["rows"], rec["rank_by"]
    knobs = [n for n, _ in rec["config"]["grid"]]
    best = best_row(rows, rank_by)
    if best is None:
        return f"No combination has a {rank_by}: nothing is ranked."
    head = f"Best by {rank_by}: {combo_label(rows[best], knobs)}"
    tied = not_separated(rows, rank_by, best)
    unranked = [combo_label(r, knobs) for r in rows if r.get(rank_by) is None]
    tail = f" Not ranked (no {rank_by}): {', '.join(unranked)}." if unranked else ""
    if not tied:
        return head + (" (the only ranked combination)." if len(unranked) == len(rows) - 1
                       else " — its 95 % interval is clear of every other ranked combination's.") + tail
    more = ("more test images (--likelihood-images)" if rank_by == "bits_per_dim"
            else "more images per class (--per-class)")
    return (f"{head}, but not separated from {', '.join(combo_label(rows[i], knobs) for i in tied)} at this n "
            f"(95 % intervals overlap); {more} would tell them apart, or not." + tail)


def sweep_uri(cfg: SweepConfig, root: str | None = None) -> str:
    from meddiff.data.shards import open_dataset

    ds = open_dataset(cfg.dataset_uri)
    key = content_hash({"dataset": ds.version, "config": {**dataclasses.asdict(cfg), "dataset_uri": None,
                                                          "device": None}})
    return storage.join(storage.storage_root(root), "sweeps", f"{ds.card.get('name', 'dataset')}-{key}")


METRICS = ("kid", "fid", "label_fidelity", "ssim_to_nearest_train", "intra_class_ssim", "bits_per_dim")


def table_html(rec: dict[str, Any]) -> str:
    """A self-contained HTML page: one row per combination, the best one marked (green), the ones it is
    not separated from marked too (yellow), and the real val-vs-train baseline as the last row."""
    rows, rank_by = rec["rows"], rec["rank_by"]
    knobs = [n for n, _ in rec["config"]["grid"]]
    cols = knobs + list(METRICS)
    best = best_row(rows, rank_by)
    tied = set(not_separated(rows, rank_by, best))

    def cell(r: dict[str, Any], c: str) -> str:
        v = r.get(c)
        if isinstance(v, float):
            ci = r.get(f"{c}_ci")
            return f"{v:.4g}" + (f" <small>[{ci[0]:.3g}, {ci[1]:.3g}]</small>" if ci else "")
        return html.escape("—" if v is None else str(v))

    def mark(i: int) -> str:
        return " class=best" if i == best else " class=tied" if i in tied else ""

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(f"<tr{mark(i)}>" + "".join(f"<td>{cell(r, c)}</td>" for c in cols) + "</tr>"
                   for i, r in enumerate(rows))
    base = rows[0] if rows else {}
    baseline = (f"<tr class=baseline><td colspan={len(knobs)}>real val vs train (baseline)</td>"
                + "".join(f"<td>{cell({m: base.get(f'{m}_baseline')}, m)}</td>" for m in METRICS) + "</tr>")
    return ("<!doctype html><meta charset=utf-8><title>sweep</title><style>td,th{padding:2px 8px;"
            "border-bottom:1px solid #ccc} .best{background:#dfd} .tied{background:#ffd} .baseline{color:#555;"
            "font-style:italic}</style>"
            f"<h1>Ablation sweep</h1><p>{html.escape(best_sentence(rec), quote=False)}</p><p>Green: the best by "
            f"{html.escape(rank_by)}; yellow: not separated from it (95 % intervals overlap). Brackets: 95 % CIs. "
            f"Synthetic rows: {base.get('n_synthetic', '?')} images each.</p>"
            f"<table><tr>{head}</tr>{body}{baseline}</table>")


def finish_sweep(cfg: SweepConfig, rows: list[dict[str, Any]], root: str | None = None) -> dict[str, Any]:
    """Write sweep.parquet, sweep.html and sweep.json (last); returns the record."""
    import pandas as pd

    uri = sweep_uri(cfg, root)
    knobs = [n for n, _ in cfg.grid]
    best = best_row(rows, cfg.rank_by)
    tied = not_separated(rows, cfg.rank_by, best)
    frame = pd.DataFrame(rows)
    for c in [c for c in frame.columns if c.endswith("_ci")]:
        frame[c] = frame[c].apply(lambda v: None if v is None else [float(x) for x in v])
    storage.write_bytes(storage.join(uri, "sweep.parquet"), frame.to_parquet(index=False))
    from meddiff.data.shards import open_dataset

    inputs = {"dataset": cfg.dataset_uri, "dataset_version": open_dataset(cfg.dataset_uri).version}
    record = make_record("sweep", cfg, inputs, uri=uri, rank_by=cfg.rank_by,
                         best=None if best is None else {k: rows[best][k] for k in knobs},
                         best_model_uri=None if best is None else rows[best]["model_uri"],
                         tied_with_best=[{k: rows[i][k] for k in knobs} for i in tied], rows=rows)
    storage.write_bytes(storage.join(uri, "sweep.html"), table_html(record).encode())
    storage.write_json(storage.join(uri, "sweep.json"), record)
    return record


def run_sweep(cfg: SweepConfig, root: str | None = None,
              call: Callable[..., dict[str, Any]] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """The whole sweep, combination after combination (``call(run_combination, cfg, combo, root)``
    lets a flow run each as a task); a finished sweep is returned as recorded. ``progress`` (without
    ``call``) follows each stage of each combination, told which combination and stage start."""
    cfg = cfg.check()
    done = storage.join(sweep_uri(cfg, root), "sweep.json")
    if storage.exists(done):
        tell(progress, f"reusing {done}: the same sweep finished before")
        return storage.read_json(done)
    if call is not None:
        return finish_sweep(cfg, [call(run_combination, cfg, combo, root) for combo in combinations(cfg)], root)
    combos, rows = combinations(cfg), []
    for i, combo in enumerate(combos):  # what each says is prefixed: "combination 2 of 4 (schedule=cosine): train"
        which = f"combination {i + 1} of {len(combos)} ({combo_label(combo, list(combo))}): "
        rows.append(run_combination(cfg, combo, root, None if progress is None else told_as(progress, which)))
    return finish_sweep(cfg, rows, root)
