"""``meddiff ingest`` and ``meddiff datasets list|show``."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from meddiff.cli import app
from meddiff.cli.tables import UNREADABLE, print_listing, readable, titled
from meddiff import storage
from meddiff.progress import rich_progress

datasets = typer.Typer(no_args_is_help=True, help="Inspect ingested dataset versions.")
app.add_typer(datasets, name="datasets")
console = Console()


def counts_table(card: dict) -> Table:
    t = titled(f"{card['name']} {card['version']}  ({card['image_size']} px, {card['channels']} ch)")
    t.add_column("class")
    splits = list(card["counts"])
    for s in splits:
        t.add_column(s, justify="right")
    for c in card["class_names"]:
        t.add_row(c, *(str(card["counts"][s][c]) for s in splits))
    t.add_row("[bold]total", *(f"[bold]{card['totals'][s]}" for s in splits))
    return t


@app.command()
def ingest(
    source: str = typer.Argument(..., help="medmnist:<flag> | kaggle:<owner>/<slug> | zip:<path> | folder:<path>"),
    size: Optional[int] = typer.Option(None, help="Output size in px (MedMNIST: 28|64|128|224; default 28 / 64)."),
    name: Optional[str] = typer.Option(None, help="Dataset name (default: from the source)."),
    classes: Optional[str] = typer.Option(None, help="zip/folder: 'glob[=name],...' class folders to keep/rename."),
    split_seed: int = typer.Option(0, help="Seed of the stratified split (zip/folder)."),
    val_frac: float = typer.Option(0.1, help="Validation fraction per class (zip/folder)."),
    test_frac: float = typer.Option(0.2, help="Test fraction per class (zip/folder)."),
    shard_size: int = typer.Option(10_000, help="Max samples per shard."),
    medmnist_root: Optional[str] = typer.Option(None, envvar="MEDMNIST_ROOT",
                                                help="Folder with already-downloaded MedMNIST .npz files."),
    shuffle_seed: int = typer.Option(0, help="Seed of the random order each split is written in."),
    bit_depth: Optional[int] = typer.Option(None, help="16-bit/int inputs: sensor bits, e.g. 12 (default: detected)."),
    window: Optional[str] = typer.Option(None, help="'lo,hi' percentiles: per-image window to 8 bits instead."),
    colour: str = typer.Option("auto", help="zip/folder/kaggle: auto (1 channel unless an image holds colour), "
                                            "grey or rgb."),
    splits: str = typer.Option("auto", help="zip/folder/kaggle: auto (class folders inside train/, val/, test/ "
                                            "folders keep that split) or random (one stratified split of all)."),
    labels: Optional[str] = typer.Option(None, help="zip/folder/kaggle: a CSV of labels instead of class folders "
                                                    "(a file inside the source, or on disk)."),
    id_column: str = typer.Option("image", help="--labels: the column naming each image (its path inside the "
                                                "source, or its file name without extension)."),
    label_column: str = typer.Option("label", help="--labels: the column holding each image's class; one-hot "
                                                   "tables: the class columns, e.g. MEL,NV,BCC."),
    group_column: Optional[str] = typer.Option(None, help="--labels: a patient/lesion id column; each group's "
                                                          "images go to one split."),
    group_pattern: Optional[str] = typer.Option(None, help="zip/folder/kaggle: a regex on each file's path whose "
                                                           "match is its patient, e.g. 'person\\d+'; each "
                                                           "patient's images go to one split."),
    frames: str = typer.Option("first", help="Multi-frame files (TIFF stacks, GIFs, DICOM volumes/clips): first "
                                             "(a DICOM is skipped) or all (every frame an image, a file's frames "
                                             "in one split)."),
    storage_root: Optional[str] = typer.Option(None, "--storage", envvar=storage.ENV_VAR, help="Storage root."),
) -> None:
    """Ingest a dataset into versioned WebDataset shards; prints the dataset URI."""
    from meddiff.data.ingest import IngestConfig, ingest as run_ingest  # here: `meddiff --help` stays fast
    from meddiff.data.pixel_survey import ingest_notes
    from meddiff.data.shards import empty_splits, label_summary, split_note

    cfg = IngestConfig(source, size, name, classes, split_seed, val_frac, test_frac, shard_size, medmnist_root,
                       shuffle_seed=shuffle_seed, bit_depth=bit_depth, window=window,
                       colour=colour, splits=splits, labels=labels, id_column=id_column,  # type: ignore[arg-type]
                       label_column=label_column, group_column=group_column, group_pattern=group_pattern,
                       frames=frames)  # type: ignore[arg-type]
    with rich_progress(f"ingest {source}") as progress:
        result = run_ingest(cfg, storage_root, progress)
    console.print(counts_table(result.card))
    if result.existed:
        console.print("[yellow]version already exists; nothing to do")
    for note in ingest_notes(result.card):
        console.print(note)
    if note := split_note(result.card):
        console.print(note)
    if labels := label_summary(result.card):
        console.print(f"labels: {labels}")
    if result.card["num_skipped"]:
        console.print(f"[yellow]{result.card['num_skipped']} inputs skipped (listed in dataset.json)")
    for w in empty_splits(result.card):
        console.print(Text(f"warning: {w}", style="yellow"))
    print(result.uri)


@datasets.command("list")
def list_(storage_root: Optional[str] = typer.Option(
        None, "--storage", envvar=storage.ENV_VAR, help="Storage root (a folder or s3://bucket/prefix; default ./storage).")) -> None:
    """List complete dataset versions under the storage root."""
    from meddiff.data.shards import open_dataset
    from meddiff.data.sources import SPLITS

    def columns(uri: str) -> tuple[str, str, str]:  # size, classes, split counts
        c = open_dataset(uri).card
        counts = "/".join(str(c["totals"][s]) for s in SPLITS)
        return f"{c['image_size']}px×{c['channels']}", str(c["num_classes"]), counts

    root = storage.join(storage.storage_root(storage_root), "datasets")
    t, problems = Table("name", "version", "size", "classes", "train/val/test", "uri"), []
    for name in storage.listdir(root):
        for version in storage.listdir(storage.join(root, name)):
            uri = storage.join(root, name, version)
            if not storage.exists(storage.join(uri, "dataset.json")):
                continue
            t.add_row(name, version, *(readable(lambda: columns(uri), problems) or (UNREADABLE, "", "")), uri)
    print_listing(t, "datasets", storage.storage_root(storage_root), "`meddiff ingest`", problems)


@datasets.command()
def show(uri: str = typer.Argument(
        ..., help="A dataset version's URI (printed by meddiff ingest; see meddiff datasets list).")) -> None:
    """Show a dataset version's card and per-class counts."""
    from meddiff.data.pixel_survey import pixel_summary
    from meddiff.data.shards import empty_splits, label_summary, open_dataset, split_summary

    card = open_dataset(uri).card
    console.print(counts_table(card))
    for w in empty_splits(card):
        console.print(Text(f"warning: {w}", style="yellow"))
    for k in ("source", "license", "created_at", "inputs"):
        console.print(f"[bold]{k}[/]: {card.get(k)}")
    console.print(f"[bold]pixels[/]: {pixel_summary(card)}")
    if splits := split_summary(card):
        console.print(f"[bold]splits[/]: {splits}")
    if labels := label_summary(card):
        console.print(f"[bold]labels[/]: {labels}")
    if card["skipped"]:
        console.print(f"[yellow]skipped {card['num_skipped']}:[/] {card['skipped'][:10]}")
    dup = card.get("duplicates")  # versions ingested before 2026-12-07 have no such field
    if dup and dup["across_splits"]:
        console.print(f"[yellow]duplicates:[/] {dup['across_splits']} image(s) stored identically in two splits "
                      f"(held-out copies of other splits' images); {dup['rule']}")
