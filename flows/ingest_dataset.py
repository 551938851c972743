"""Prefect flow ``ingest-dataset``: the same parameters as ``meddiff ingest``."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import (MEDMNIST_ENV, RESULT_OPTIONS, artifact_key, dataset_tag, explain_wait, from_env,
                          LoggedProgress, one_traceback_per_failure, phrased, prefect_progress, publish_link,
                          retry_transient, tag_run, user_errors)
from meddiff.data.ingest import IngestConfig, IngestResult, ingest
from meddiff.data.pixel_survey import Colour, Frames, ingest_notes, pixel_summary
from meddiff.data.shards import empty_splits, label_summary, split_note
from meddiff.data.sources import SplitRule
from meddiff.progress import combine

_D = IngestConfig("")  # the library's defaults: the flow restates them (tests/test_flow_defaults.py)


@task(name="ingest", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
@phrased
def ingest_task(cfg: IngestConfig, storage_root: str | None) -> IngestResult:
    progress = combine(prefect_progress(f"ingest {cfg.source}"), LoggedProgress(get_run_logger(), "ingest", " images"))
    return ingest(cfg, storage_root, progress)


def card_markdown(card: dict) -> str:
    splits = list(card["counts"])
    lines = [f"# Dataset {card['name']} `{card['version']}`", "", f"URI: `{card['uri']}`", "",
             "| class | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    lines += [f"| {c} | " + " | ".join(str(card["counts"][s][c]) for s in splits) + " |" for c in card["class_names"]]
    lines += ["| **total** | " + " | ".join(str(card["totals"][s]) for s in splits) + " |"]
    lines += ["", f"Pixels: {pixel_summary(card)}"]
    if card["num_skipped"]:
        lines += ["", f"{card['num_skipped']} inputs skipped (see dataset.json)."]
    return "\n".join(lines)


@flow(name="ingest-dataset", flow_run_name="ingest-{source}", **RESULT_OPTIONS)
def ingest_dataset(
    source: str,
    size: int | None = _D.size,
    name: str | None = _D.name,
    classes: str | None = _D.classes,
    split_seed: int = _D.split_seed,
    val_frac: float = _D.val_frac,
    test_frac: float = _D.test_frac,
    shard_size: int = _D.shard_size,
    medmnist_root: str | None = _D.medmnist_root,
    shuffle_seed: int = _D.shuffle_seed,
    bit_depth: int | None = _D.bit_depth,
    window: str | None = _D.window,
    colour: Colour = _D.colour,
    splits: SplitRule = _D.splits,
    labels: str | None = _D.labels,
    id_column: str = _D.id_column,
    label_column: str = _D.label_column,
    group_column: str | None = _D.group_column,
    group_pattern: str | None = _D.group_pattern,
    frames: Frames = _D.frames,
    storage_root: str | None = None,
) -> str:
    """Ingest a dataset source into a versioned WebDataset copy; returns its URI (the run's persisted result).

    Args:
        source: medmnist:<flag> (e.g. medmnist:bloodmnist), kaggle:<owner>/<slug>, zip:<path> or folder:<path>.
        size: Output side in px; empty = 28 for MedMNIST, 64 for image folders.
        name: Dataset name; empty = derived from the source.
        classes: zip/folder: "glob[=name],..." selecting and renaming class folders, e.g. 'Original/*'.
        split_seed: Seed of the stratified train/val/test split (zip/folder).
        val_frac: Validation fraction per class (zip/folder).
        test_frac: Test fraction per class (zip/folder).
        shard_size: Maximum samples per shard.
        medmnist_root: Folder with already-downloaded MedMNIST .npz files; empty = the worker's MEDMNIST_ROOT, else download from zenodo.
        shuffle_seed: Seed of the random order each split is written in.
        bit_depth: 16-bit/integer inputs: the sensor's bits, e.g. 12; empty = detected from the dataset's largest value.
        window: "lo,hi" percentiles, e.g. "0.5,99.5": a per-image window to 8 bits instead of the bit depth.
        colour: zip/folder/kaggle: auto (1 channel unless an image holds colour), grey or rgb.
        splits: zip/folder/kaggle: auto = class folders inside published split folders (train/, val/, test/) keep that split; random = one stratified split of all.
        labels: zip/folder/kaggle: a CSV of labels instead of class folders (a file inside the source, or a path on the worker).
        id_column: With labels: the column naming each image (its path inside the source, or its file name without extension).
        label_column: With labels: the column holding each image's class.
        group_column: With labels: a patient/lesion id column; each group's images go to one split.
        group_pattern: zip/folder/kaggle: a regex on each file's path whose match (its first group, if any) is the patient, e.g. 'person\\d+'; each patient's images go to one split.
        frames: Multi-frame files (TIFF stacks, GIFs, DICOM volumes or clips): first (a DICOM is skipped) or all (every frame an image, a file's frames in one split).
        storage_root: Storage root (folder or s3://bucket/prefix); empty = the worker's MEDDIFF_STORAGE, else ./storage.
    """
    one_traceback_per_failure()
    explain_wait()
    logger = get_run_logger()
    tag_run(dataset_tag(source))
    with user_errors():
        if source.startswith("medmnist:"):  # the worker's MEDMNIST_ROOT, as the CLI reads it
            medmnist_root = from_env(medmnist_root, MEDMNIST_ENV)
        cfg = IngestConfig(source, size, name, classes, split_seed, val_frac, test_frac, shard_size,
                           medmnist_root, shuffle_seed, bit_depth, window, colour, splits, labels, id_column,
                           label_column, group_column, group_pattern, frames).check()
        result = ingest_task(cfg, storage_root)
    logger.info("%s dataset version %s", "found existing" if result.existed else "wrote", result.uri)
    for note in ingest_notes(result.card):
        logger.info(note)
    if note := split_note(result.card):
        logger.info(note)
    if labels := label_summary(result.card):
        logger.info("labels: %s", labels)
    for warning in empty_splits(result.card):
        logger.warning(warning)
    create_markdown_artifact(card_markdown(result.card), key=artifact_key("dataset", result.card["name"]),
                             description="dataset summary")
    publish_link("dataset", result.uri, result.card["name"], target=f"{result.uri}/dataset.json")
    logger.info("result: %s", result.uri)
    return result.uri
