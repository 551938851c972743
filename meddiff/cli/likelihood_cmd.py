"""``meddiff likelihood``: bits/dim of a DDPM model on a real split (variational bound)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from meddiff.cli import app
from meddiff.cli.tables import print_fitted, titled
from meddiff.progress import rich_progress

console = Console()


@app.command()
def likelihood(
    model_uri: str = typer.Argument(..., help="A DDPM model (storage/models/<run-id>)."),
    dataset_uri: Optional[str] = typer.Argument(None, help="The real dataset version to score (default: the one "
                                                "the model learned from)."),
    split: str = typer.Option("test", help="train | val | test"),
    max_images: Optional[int] = typer.Option(500, help="Seeded subsample of the split (0 = all)."),
    timesteps: Optional[int] = typer.Option(100, help="Stratified KL timesteps per image (0 = the full chain)."),
    variance: str = typer.Option("large", help="Reverse-step variance: large (β) | small (β̃)."),
    unconditional: bool = typer.Option(False, "--unconditional", help="Conditional models: p(x), not p(x|y)."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    seed: int = typer.Option(0, help="Subsample and noise seed."),
) -> None:
    """Negative log-likelihood bound in bits/dim (Ho et al. 2020), overall and per class; prints the record path."""
    from meddiff.models.likelihood import LikelihoodConfig, likelihood as run  # torch loads only when used

    cfg = LikelihoodConfig(split=split, max_images=max_images or None, timesteps=timesteps or None,
                           batch_size=batch_size, conditional=not unconditional, variance=variance,
                           device=device, seed=seed)
    with rich_progress("likelihood") as progress:  # images scored
        rec = run(model_uri, dataset_uri, cfg, progress)
    t = titled(f"bits/dim ({rec['conditioning']}) on {split}: {rec['estimator']}")
    for col in ("scope", "bits/dim", "95% CI", "n"):
        t.add_column(col)
    for scope, r in [("overall", rec["overall"]), *rec["per_class"].items()]:
        t.add_row(scope, f"{r['bits_per_dim']:.4f}", f"{r['ci'][0]:.4f} – {r['ci'][1]:.4f}", str(r["n"]))
    print_fitted(console, t)
    print(rec["uri"])
