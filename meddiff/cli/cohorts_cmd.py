"""``meddiff generate`` and ``meddiff cohorts list|show|verify|regenerate``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from meddiff.cli import app
from meddiff.cli.tables import UNREADABLE, print_listing, print_table, readable, titled, unfinished_status, where_now
from meddiff import storage
from meddiff.errors import MeddiffError
from meddiff.progress import rich_progress

cohorts = typer.Typer(no_args_is_help=True, help="Inspect and verify synthetic cohorts.")
app.add_typer(cohorts, name="cohorts")
console = Console()


def counts_table(title: str, counts: dict[str, int]) -> Table:
    t = titled(title, "class", "images")
    for name, n in counts.items():
        t.add_row(name, str(n))
    t.add_row("[bold]total", f"[bold]{sum(counts.values())}")
    return t


@app.command()
def generate(
    model_uri: str = typer.Argument(..., help="A trained model's URI (printed by meddiff train)."),
    per_class: Optional[int] = typer.Option(None, help="N images of every class."),
    total: Optional[int] = typer.Option(None, help="N images split evenly, or by --ratios."),
    ratios: Optional[str] = typer.Option(None, help="Prevalence ratios of --total: 'name=p,...' (or class ids)."),
    sampler: str = typer.Option("auto", help="auto (dpmpp2m for v-prediction DDPM models, ddim for ε, heun for rectified flow) | "
                                "ddim | ddpm | dpmpp2m (DDPM ε/v models) | rflow | heun (rectified flow)."),
    steps: Optional[int] = typer.Option(None, help="Reverse-diffusion steps (heun: 2·steps − 1 network calls); "
                                        "default: the sampler's measured default (ddim 50, ddpm 100, others 25)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (conditional models; "
                                             "default 2.0, or 1.0 for a model trained with label dropout 0)."),
    seed: int = typer.Option(0, help="Base seed; every image's own seed derives from it."),
    batch_size: int = typer.Option(64, help="Images per forward pass (recorded; can move an image's last bits)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    shard_size: int = typer.Option(1000, help="Images per shard (= per resumable chunk)."),
    name: Optional[str] = typer.Option(None, help="Cohort id (default: derived from the model and spec)."),
    unconditional: bool = typer.Option(False, "--unconditional", help="Conditional models trained with label "
                                       "dropout: sample p(x) through the null label, no class asked (needs --total; "
                                       "manifest class '(unknown)', evaluate records the oracle's class)."),
    storage_root: Optional[str] = typer.Option(None, "--storage", envvar=storage.ENV_VAR, help="Storage root."),
) -> None:
    """Generate a class-balanced synthetic cohort; prints per-class counts and the cohort URI."""
    from meddiff.generate import CohortSpec, generate as run_generate  # torch/MONAI load only when used

    spec = CohortSpec(model_uri, per_class, total, ratios, sampler, steps, guidance, seed, batch_size, device,
                      shard_size, name, unconditional)  # type: ignore[arg-type]
    with rich_progress("generate") as progress:
        result = run_generate(spec, storage_root, progress)
    console.print(counts_table(f"cohort {Path(result.uri).name}", result.counts))
    if result.existed:
        console.print("[yellow]cohort already complete; nothing to do")
    print(result.uri)


@cohorts.command("list")
def list_(storage_root: Optional[str] = typer.Option(
        None, "--storage", envvar=storage.ENV_VAR, help="Storage root (a folder or s3://bucket/prefix; default ./storage).")) -> None:
    """List cohorts under the storage root (complete and in progress)."""
    from meddiff.data.cohorts import open_cohort  # here: `meddiff --help` stays fast

    root = storage.join(storage.storage_root(storage_root), "cohorts")
    t, problems = Table("cohort", "status", "images", "sampler", "model", "report", "uri"), []
    for cid in storage.listdir(root):
        uri = storage.join(root, cid)
        if not storage.exists(storage.join(uri, "cohort.json")):
            t.add_row(cid, unfinished_status(uri, "incomplete (resumable)"), "", "", "", "", uri)
            continue
        c = readable(lambda: open_cohort(uri).card, problems)
        if c is None:
            t.add_row(cid, UNREADABLE, "", "", "", "", uri)
            continue
        t.add_row(cid, "complete", str(c["total"]), f"{c['sampler']}×{c['steps']}", Path(c["model_uri"]).name,
                  readable(lambda: report_label(uri), problems) or UNREADABLE, uri)
    print_listing(t, "cohorts", storage.storage_root(storage_root), "`meddiff generate`", problems)


def report_sentence(uri: str) -> tuple[str, str | None] | None:
    """(the cohort's report verdict sentence, why it is outdated or None), or None when it has no report yet."""
    from meddiff.data.shards import read_card
    from meddiff.evaluate.schema import outdated

    if not storage.exists(storage.join(uri, "report.json")):
        return None
    record = read_card(uri, "report.json")  # damaged: an ArtifactError naming it
    return record["verdict"]["sentence"], outdated(record)


def report_label(uri: str) -> str:
    """The verdict's opening words ("Not fit for use", "Fit for use with care", ...), "… (outdated)" when an older
    report schema's rules judged it, or "none"."""
    said = report_sentence(uri)
    if said is None:
        return "none"
    return said[0].split(":")[0] + (" (outdated)" if said[1] else "")


@cohorts.command()
def show(uri: str = typer.Argument(
        ..., help="A cohort's URI (printed by meddiff generate; see meddiff cohorts list).")) -> None:
    """Show a cohort's spec and per-class counts."""
    from meddiff.data.cohorts import open_cohort

    card = open_cohort(uri).card
    console.print(f"[bold]cohort[/] {card.get('cohort_id') or uri.rstrip('/').rsplit('/', 1)[-1]}", soft_wrap=True)
    console.print(counts_table("", card["counts"]))
    now = {"model_uri": where_now(card.get("model_uri"), uri, "model.json"),  # where they are now (a moved root)
           "dataset_uri": where_now(card.get("dataset_uri"), uri, "dataset.json")}
    for k in ("model_uri", "dataset_uri", "sampler", "steps", "guidance_scale", "seed", "created_at", "seconds"):
        console.print(f"[bold]{k}[/]: {now.get(k, card.get(k))}", soft_wrap=True)
    if ae := card.get("autoencoder"):  # latent cohorts: the images were decoded through this AE
        console.print(f"[bold]autoencoder[/]: {where_now(ae['uri'], uri, 'model.json')} "
                      f"(sha256 {ae['sha256'][:16]}…)", soft_wrap=True)
    problems: list[str] = []
    said = readable(lambda: report_sentence(uri), problems)  # what a consumer asks next: is it fit for use?
    console.print(Text.assemble(("report", "bold"), f": {said[0]} ({storage.join(uri, 'report.html')})" if said
                                else f": unreadable: {problems[0]} (meddiff evaluate {uri} writes it again)"
                                if problems else f": none yet (meddiff evaluate {uri})"), soft_wrap=True)
    if said and said[1]:  # e.g. schema 5 compared a balanced cohort with real data of another class mix
        console.print(Text(f"outdated: {said[1]}: re-run `meddiff evaluate {uri}` for a current verdict",
                           style="yellow"), soft_wrap=True)


@cohorts.command()
def verify(uri: str = typer.Argument(
        ..., help="A cohort's URI (printed by meddiff generate; see meddiff cohorts list).")) -> None:
    """Check that shards and manifest match exactly (keys, counts, image hashes)."""
    from meddiff.data.cohorts import verify as verify_cohort

    result = verify_cohort(uri)
    console.print(counts_table("images per class", result.counts))
    if result.ok:
        console.print("[green]ok: shards and manifest match")
        return
    for p in result.problems:
        console.print(f"[red]{p}", soft_wrap=True)
    raise MeddiffError(f"{uri} does not verify ({len(result.problems)} problem(s) listed above); the cohort is "
                       "damaged or was edited: delete it and re-run `meddiff generate` (it is content-addressed)")


@cohorts.command()
def regenerate(uri: str = typer.Argument(..., help="The cohort's URI (printed by meddiff generate)."),
               sample_id: int = typer.Argument(..., help="The sample's id (the manifest's sample_id column)."),
               out: Path = typer.Option(..., help="PNG file to write (.png)."),
               device: Optional[str] = typer.Option(None, help="Default: the recorded device type (warns "
                                                    "when it cannot be matched)."),
               alone: bool = typer.Option(False, help="Batch of one: equal up to the last bits (±1 grey level).")) -> None:
    """Regenerate one sample from its own seed and say whether it is byte-identical to the stored image.

    Exits 1 when a default (in-batch) regeneration differs."""
    from meddiff.data.cohorts import stored_png
    from meddiff.data.images import pixel_difference
    from meddiff.generate import regenerate as run_regenerate
    from meddiff.records import sha256_bytes

    if out.suffix.lower() != ".png" or out.is_dir():  # before sampling: the bytes written are PNG, always
        raise MeddiffError(f"--out {out} must name a .png file (the image is written as PNG, the format the "
                           "cohort stores and compares byte for byte)")
    png = run_regenerate(uri, sample_id, device, alone)
    storage.write_bytes(str(out), png)  # atomic; the folder is created
    stored = stored_png(uri, sample_id)
    same = png == stored
    if same:
        typer.echo(f"identical to the stored image (sha256 {sha256_bytes(png)[:16]}…)", err=True)
    else:
        try:
            n, worst = pixel_difference(png, stored)
        except (OSError, ValueError) as e:  # a damaged shard: not this command's to explain
            raise MeddiffError(f"the stored image of sample {sample_id} cannot be compared ({e}): "
                               f"run meddiff cohorts verify {uri}") from e
        typer.secho(f"differs from the stored image: {n} pixel value(s), by at most {worst} grey level(s)" +
                    (" (expected with --alone)" if alone else " — regenerate on the recorded device type (see any "
                     "warning above); 'meddiff cohorts verify' checks the stored shards"), err=True, fg="yellow")
    print(out)
    if not same and not alone:
        raise typer.Exit(1)
