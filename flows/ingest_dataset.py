"""Prefect flow ``ingest-dataset``: the same parameters as ``meddiff ingest``."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import artifact_key, prefect_progress, retry_transient
from meddiff.data.ingest import IngestConfig, IngestResult, ingest


@task(name="ingest", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def ingest_task(cfg: IngestConfig, storage_root: str | None) -> IngestResult:
    return ingest(cfg, storage_root, prefect_progress(f"ingest {cfg.source}"))


def card_markdown(card: dict) -> str:
    splits = list(card["counts"])
    lines = [f"# Dataset {card['name']} `{card['version']}`", "", f"URI: `{card['uri']}`", "",
             "| class | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    lines += [f"| {c} | " + " | ".join(str(card["counts"][s][c]) for s in splits) + " |" for c in card["class_names"]]
    lines += ["| **total** | " + " | ".join(str(card["totals"][s]) for s in splits) + " |"]
    if card["num_skipped"]:
        lines += ["", f"{card['num_skipped']} inputs skipped (see dataset.json)."]
    return "\n".join(lines)


@flow(name="ingest-dataset")
def ingest_dataset(
    source: str,
    size: int | None = None,
    name: str | None = None,
    classes: str | None = None,
    split_seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    shard_size: int = 10_000,
    medmnist_root: str | None = None,
    storage_root: str | None = None,
) -> str:
    """Ingest a dataset source into a versioned WebDataset copy; returns its URI."""
    logger = get_run_logger()
    cfg = IngestConfig(source, size, name, classes, split_seed, val_frac, test_frac, shard_size, medmnist_root)
    result = ingest_task(cfg.check(), storage_root)
    logger.info("%s dataset version %s", "found existing" if result.existed else "wrote", result.uri)
    create_markdown_artifact(card_markdown(result.card), key=artifact_key("dataset", result.card["name"]),
                             description="dataset summary")
    return result.uri
