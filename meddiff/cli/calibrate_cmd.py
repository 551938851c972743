"""``meddiff calibrate``: score three reference "generators" (perfect, memorizer, collapsed) built
from a real dataset with the normal evaluation, so its verdicts can be trusted."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from meddiff.cli import app
from meddiff.cli.tables import print_fitted, titled
from meddiff.progress import rich_progress

console = Console()


@app.command()
def calibrate(
    dataset_uri: str = typer.Argument(..., help="A real dataset version (storage/datasets/<name>/<version>)."),
    cohort_size: int = typer.Option(400, help="Images per reference generator (a typical cohort)."),
    features: str = typer.Option("domain", help="Extractors for the set metrics: inception,domain."),
    domain_steps: Optional[int] = typer.Option(None, help="Domain classifier training steps (default: its own)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    seed: int = typer.Option(0, help="Which images the generators draw."),
    tstr: bool = typer.Option(True, help="TSTR of each generator beside equal-size real training images."),
    tstr_steps: int = typer.Option(300, help="TSTR optimizer steps per classifier (the same for every setting)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if calibration.json exists."),
) -> None:
    """Score known generators (held-out real, memorizer, collapsed) to see which failures the verdicts catch.

    "perfect" draws held-out real images, "memorizer" copies training images (some mirrored, noised or
    recompressed), "collapsed" draws each class from a few training images.
    Writes calibration.json + .html under <storage>/calibration/."""
    from dataclasses import replace

    from meddiff.evaluate.calibrate import (GENERATORS, CalibrationConfig, accuracy_ci, calibrate as run,
                                            calibration_table)
    from meddiff.evaluate.config import EvalConfig
    from meddiff.evaluate.features import DomainTrainConfig

    domain = DomainTrainConfig() if domain_steps is None else replace(DomainTrainConfig(), steps=domain_steps)
    ecfg = EvalConfig(features=tuple(f.strip() for f in features.split(",") if f.strip()), domain=domain,
                      device=device, seed=seed, tstr_steps=tstr_steps)
    with rich_progress("calibrate") as progress:  # stages, each named above the bar as it starts
        uri, record = run(dataset_uri, CalibrationConfig(cohort_size=cohort_size, seed=seed, tstr=tstr, eval=ecfg),
                          force=force, progress=progress)
    n = record["perfect"]["n"]  # the perfect generator draws from half the test split: it may cap the size
    limit = f"; the test split's other half limits it, --cohort-size asked {cohort_size}" if n < cohort_size else ""
    t = titled(f"calibration of {dataset_uri} ({n} images per generator{limit})")
    for col in ("metric", *GENERATORS):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for row in calibration_table(record):
        t.add_row(*row)
    print_fitted(console, t)
    for g in GENERATORS:
        console.print(f"{g}: {record[g]['sentence']}", markup=False, highlight=False)
    if record.get("tstr"):
        t = record["tstr"]
        console.print(f"TSTR accuracy on the held-out half ({t['n_test']} images, {t['steps']} steps each; "
                      f"95 % Wilson intervals): real training images at equal size "
                      f"{accuracy_ci(t['real_equal_size'])}; " +
                      ", ".join(f"{g} {accuracy_ci(t['generators'][g])}" for g in GENERATORS))
    print(uri.rsplit("/", 1)[0] + "/calibration.html")
    print(uri)
