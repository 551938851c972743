"""``meddiff sweep`` and ``meddiff anomaly``: ablation sweeps and anomaly detection (meddiff.analysis)."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from meddiff.cli import app
from meddiff.cli.tables import print_fitted, titled
from meddiff.cli.train_cmd import parse_channels
from meddiff.progress import rich_progress

console = Console()


@app.command()
def sweep(
    dataset_uri: str = typer.Argument(..., help="A dataset version URI (printed by 'meddiff ingest')."),
    grid: List[str] = typer.Option(..., "--grid", help="KNOB=v1,v2 (repeatable): schedule, attention, channels "
                                   "(16-32,32-64), objective, prediction, lr, steps, batch_size, preset, mode."),
    mode: str = typer.Option("conditional", help="conditional | per-class (unless a --grid varies it)."),
    preset: str = typer.Option("tiny", help="Preset of every run (unless a --grid varies it)."),
    steps: Optional[int] = typer.Option(None, help="Training steps of every run; default: preset."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size; default: preset."),
    objective: str = typer.Option("ddpm", help="ddpm | rflow (likelihood for ddpm only)."),
    channels: Optional[str] = typer.Option(None, help="U-Net channels of every run, e.g. 16,32."),
    per_class: int = typer.Option(50, help="Images generated per class by every model (matched n)."),
    sample_steps: int = typer.Option(25, help="Sampler steps of generation."),
    likelihood_images: int = typer.Option(200, help="Test images for bits/dim of DDPM models (0 = skip)."),
    likelihood_timesteps: int = typer.Option(50, help="Stratified timesteps of the bits/dim estimate."),
    rank_by: str = typer.Option("kid", help="kid | fid | bits_per_dim | label_fidelity"),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    seed: int = typer.Option(0, help="Seed of every run."),
    storage_root: Optional[str] = typer.Option(None, "--storage", envvar="MEDDIFF_STORAGE", help="Storage root."),
) -> None:
    """Train, generate and evaluate one model per grid combination; prints the comparison table and its folder."""
    from meddiff.analysis.sweep import SweepConfig, best_sentence, parse_grid, run_sweep

    base = {"mode": mode, "preset": preset, "steps": steps, "batch_size": batch_size, "objective": objective}
    if channels:  # only when given: the same request from the flow then hashes to the same sweep
        base["network_channels"] = parse_channels(channels)
    cfg = SweepConfig(dataset_uri, parse_grid(grid), base, per_class, sample_steps, likelihood_images,
                      likelihood_timesteps, rank_by, device, seed)
    with rich_progress("sweep") as progress:  # each stage of each combination in turn, named above the bar
        rec = run_sweep(cfg, storage_root, progress=progress)
    print_fitted(console, sweep_table(rec))
    console.print(best_sentence(rec), markup=False, highlight=False)
    print(rec["uri"])


def sweep_table(rec: dict) -> Table:
    """One row per combination (value and 95 % CI), the best in bold, then the real baseline."""
    from meddiff.analysis.sweep import METRICS, best_row

    knobs = [n for n, _ in rec["config"]["grid"]]
    rows = rec["rows"]
    best = best_row(rows, rec["rank_by"])

    def cell(r: dict, c: str) -> str:
        v, ci = r.get(c), r.get(f"{c}_ci")
        return "—" if v is None else f"{v:.4g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")

    t = titled(f"sweep {rec['uri']} ({rows[0]['n_synthetic'] if rows else 0} synthetic images per row)")
    for c in knobs + list(METRICS):
        t.add_column(c)
    for i, r in enumerate(rows):
        t.add_row(*[str(r[k]) for k in knobs], *[cell(r, c) for c in METRICS],
                  style="bold" if i == best else None)
    base = rows[0] if rows else {}
    t.add_row("real val vs train", *[""] * (len(knobs) - 1),
              *[cell({c: base.get(f"{c}_baseline")}, c) for c in METRICS], style="italic")
    return t


@app.command()
def anomaly(
    model_uri: str = typer.Argument(..., help="A model trained on (or conditioned on) the normal class."),
    dataset_uri: Optional[str] = typer.Argument(None, help="The real dataset version to score (default: the one "
                                                "the model learned from)."),
    normal: str = typer.Option(..., help="The normal class (name or 0-based id); the others are anomalies."),
    split: str = typer.Option("test", help="train | val | test"),
    level: float = typer.Option(0.3, help="Noise level in (0, 1]: fraction of the diffusion chain."),
    steps: int = typer.Option(10, help="Denoising steps back from the noise level."),
    guidance: float = typer.Option(1.0, help="Conditional models: CFG scale toward the normal class."),
    max_images: Optional[int] = typer.Option(1000, help="Seeded subsample of the split (0 = all)."),
    heatmaps: int = typer.Option(12, help="Most anomalous images shown in heatmaps.png."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    seed: int = typer.Option(0, help="Noise and subsample seed."),
    storage_root: Optional[str] = typer.Option(None, "--storage", envvar="MEDDIFF_STORAGE", help="Storage root."),
) -> None:
    """Score every image by its partial-denoising reconstruction error; AUROC per score; prints the folder."""
    from meddiff.analysis.anomaly import AnomalyConfig, detect_anomalies

    cfg = AnomalyConfig(normal, split, level, steps, guidance, max_images or None, batch_size, heatmaps, device, seed)
    with rich_progress("anomaly") as progress:  # reconstructions (two per image with the ratio score)
        rec = detect_anomalies(model_uri, dataset_uri, cfg, storage_root, progress)
    t = titled(f"AUROC, normal = {rec['config']['normal']} ({rec['config']['split']} split)")
    for c in ("score", "anomalies", "AUROC", "95% CI", "n anomalous / normal"):
        t.add_column(c)
    for score, rows in rec["auroc"].items():
        for scope, r in rows.items():
            ci = "—" if r["ci"] is None else f"{r['ci'][0]:.3f} – {r['ci'][1]:.3f}"
            t.add_row(score, scope, f"{r['auroc']:.3f}", ci, f"{r['n_anomalous']} / {r['n_normal']}")
    print_fitted(console, t)
    console.print(f"note: {rec['notes']}")  # which scores are label-free: the feature score is not
    print(rec["uri"])
