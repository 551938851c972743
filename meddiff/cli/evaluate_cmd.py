"""``meddiff evaluate``: quality report of a synthetic cohort (fidelity, diversity, privacy, utility)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from meddiff.cli import app
from meddiff.cli.tables import titled
from meddiff.progress import rich_progress

console = Console()


HEADERS = ("metric", "synthetic [95 % CI]", "real baseline [95 % CI]", "n", "verdict")
METRIC_MIN_WIDTH = 17  # "KID vs held-out", "(n-dependent)" and the like stay whole
METRIC_LAST_WIDTH = 8  # narrower terminals: metric names wrap at words, or within them, before a number breaks


def headline_table(report: dict, width: int | None = None) -> Table:
    """The headline metrics in ``width`` columns: each interval beside its value where that fits, else on the
    line below it, never broken across lines ("0.2418 [0.226, / 0.257]"); the metric names wrap: at
    phrases, else at words, else anywhere."""
    from meddiff.evaluate.summary import headline_rows

    borders = 3 * len(HEADERS) + 1  # a rule and a space either side of each cell
    layouts = []  # (room left for the metric names, headers, rows, column widths)
    # the interval beside its value, headers whole; below it, headers whole; below it, headers one word a line
    for ci_sep, header_lines in ((" ", str.splitlines), ("\n", str.splitlines), ("\n", str.split)):
        rows = headline_rows(report, ci_sep)
        headers = [h.replace(" [", ci_sep + "[") for h in HEADERS]
        widths = [max(len(line) for line in "\n".join(column).splitlines() + header_lines(header))
                  for column, header in zip(zip(*rows), headers)]  # the widest line of each column
        layouts.append(((width or 100_000) - borders - sum(widths[1:]), headers, rows, widths))
    # the first layout whose metric names keep their phrases, else the one leaving them the most room
    room, headers, rows, widths = next((lay for lay in layouts if lay[0] >= METRIC_MIN_WIDTH),
                                       max(layouts, key=lambda lay: lay[0]))
    if room < METRIC_LAST_WIDTH:  # a very narrow terminal: cells wrap where they must
        return _headline_table(report, headers, rows, None)
    return _headline_table(report, headers, rows, [min(widths[0], room)] + widths[1:])


def _headline_table(report: dict, headers: list[str], rows: list[tuple[str, ...]], widths: list[int] | None) -> Table:
    inputs = report["inputs"]  # the id the report records; the whole URI is printed below the table
    t = titled(f"cohort {inputs.get('cohort_id') or inputs['cohort_uri']}  ({report['cohort']['n']} images)")
    for i, header in enumerate(headers):  # metric, synthetic, real baseline (val; TSTR: real train), n, verdict
        t.add_column(header, justify="right" if 0 < i < 4 else "left", width=widths[i] if widths else None)
    for row in rows:
        t.add_row(*row)
    return t


@app.command()
def evaluate(
    cohort_uri: str = typer.Argument(..., help="The cohort folder (local path or s3://...)."),
    real: Optional[str] = typer.Option(None, "--real", help="Real dataset version URI (default: the cohort's)."),
    features: str = typer.Option("inception,domain", help="Extractors for FID/KID/PR: inception,domain."),
    tstr: bool = typer.Option(False, "--tstr", help="Train on synthetic, test on real: classifiers on real, real "
                              "at the synthetic n, synthetic, both (equal steps; minutes on CPU)."),
    tstr_protocol: str = typer.Option("fair", help="fair: equal steps, small CNN (CPU) | medmnist: ResNet-18 v2 "
                                                   "recipe, 100 epochs of the real set (GPU)."),
    tstr_steps: int = typer.Option(300, help="Optimizer steps per TSTR setting (protocol fair)."),
    tstr_max_images: Optional[int] = typer.Option(None, help="Cap on each TSTR training set (CPU budget)."),
    drop_flagged: bool = typer.Option(False, "--drop-flagged", help="Consumers skip memorization-flagged images."),
    max_images: Optional[int] = typer.Option(1000, help="Images per set for Inception features (0 = all)."),
    umap_points: int = typer.Option(1000, help="Real and synthetic points in the report's UMAP (0 = none)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    force: bool = typer.Option(False, "--force", help="Recompute even if an up-to-date report exists."),
) -> None:
    """Evaluate a cohort against its real dataset; writes report.json + report.html into the cohort."""
    from meddiff.evaluate import EvalConfig, evaluate_cohort  # torch/metrics load only when used

    cfg = EvalConfig(real_uri=real, features=tuple(f.strip() for f in features.split(",") if f.strip()),
                     tstr=tstr, tstr_protocol=tstr_protocol, tstr_steps=tstr_steps, tstr_max_images=tstr_max_images, drop_flagged=drop_flagged,
                     max_images=max_images or None, umap_points=umap_points, device=device)
    with rich_progress("evaluate") as progress:  # the cohort is named in the table and the paths below
        result = evaluate_cohort(cohort_uri, cfg, progress, force=force)
    # the library's prose as written: no markup read into it, no "metric(s)" coloured as a function call
    console.print(result.report["verdict"]["sentence"], markup=False, highlight=False)
    console.print(headline_table(result.report, console.width))
    for w in result.report["warnings"][:10]:
        console.print(Text(f"warning: {w}", style="yellow"))
    if result.existed:
        console.print("[yellow]an up-to-date report exists; nothing recomputed (--force to redo)")
    print(result.html_uri)
    print(result.report_uri)
