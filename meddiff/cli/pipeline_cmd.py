"""``meddiff pipeline``: the whole job (ingest → train → generate → evaluate) as the Prefect flow ``pipeline``.

Without PREFECT_API_URL the flow runs on Prefect's embedded defaults (an ephemeral local server on
SQLite); storage is ./storage unless MEDDIFF_STORAGE says otherwise.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator, Optional

import typer

from meddiff.cli import app
from meddiff import storage


EPHEMERAL_STARTUP_TIMEOUT_S = 180  # Prefect's default (20 s) is too short on a busy 2-core machine


@contextmanager
def _patient_ephemeral_server() -> Iterator[None]:
    """Give Prefect's temporary local server longer to start, unless the user set the timeout.

    Its telemetry heartbeat is switched off too (unless the user set it): on the embedded SQLite
    database it races the flow's first writes and prints a 'database is locked' traceback.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        yield
        return
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_TIMEOUT_S}):
        yield


class _UserErrorsWithoutTraceback(logging.Filter):
    """Prefect logs a failed flow run's exception with its traceback (80-odd lines). For a MeddiffError,
    bad input whose message says what to do, the traceback only buries that message; the log line
    keeps the message and the command's last line repeats it (``error: ...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from meddiff.errors import MeddiffError

        if record.exc_info and isinstance(record.exc_info[1], MeddiffError):
            record.exc_info, record.exc_text = None, None
        return True


@contextmanager
def _user_errors_in_one_line() -> Iterator[None]:
    """While the flow runs in this process: no traceback for user errors in its run loggers' lines."""
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    quiet = _UserErrorsWithoutTraceback()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


@app.command()
def pipeline(
    dataset: str = typer.Option("medmnist:bloodmnist", help="Dataset source (as for `meddiff ingest`)."),
    preset: str = typer.Option("tiny", help="Model/training preset."),
    per_class: Optional[int] = typer.Option(None, help="Images to generate per class (default 50)."),
    total: Optional[int] = typer.Option(None, help="Total images to generate, split by class ratios."),
    mode: str = typer.Option("conditional", help="conditional | per-class"),
    steps: Optional[int] = typer.Option(800, help="Training steps (800 ≈ 100 s for tiny on 2 CPU cores)."),
    objective: str = typer.Option("rflow", help="Training objective: rflow (rectified flow) | ddpm."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size (default: the preset's)."),
    preview_steps: Optional[int] = typer.Option(None, help="Sampler steps of training's preview grids."),
    sample_steps: Optional[int] = typer.Option(None, help="Denoising steps per generated image (heun: 2·steps − 1 "
                                               "calls); default: the sampler's measured default (ddim 50, others 25)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale."),
    size: Optional[int] = typer.Option(None, help="Image size in px (default: the source's)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    allow_cpu_fallback: bool = typer.Option(False, help="With --device cuda and no GPU, run on the CPU."),
    seed: int = typer.Option(0, help="Seed of training and generation."),
    evaluate: bool = typer.Option(True, help="Evaluate the cohort (quality report)."),
    eval_features: Optional[str] = typer.Option(
        None, help="Feature extractors of the evaluation, e.g. inception,domain (default: both when the "
                   "Inception weights are installed, else domain)."),
    eval_max_images: Optional[int] = typer.Option(300, help="Images per set (synthetic/train/val) through Inception."),
    domain_steps: Optional[int] = typer.Option(None, help="Optimizer steps of the evaluation's domain classifier."),
    medmnist_root: Optional[str] = typer.Option(None, envvar="MEDMNIST_ROOT",
                                                help="Folder with already-downloaded MedMNIST .npz files."),
    latent: Optional[str] = typer.Option(None, help="Latent diffusion: vae | vqvae (adds train-autoencoder + encode)."),
    ae_preset: str = typer.Option("tiny", help="Autoencoder preset (with --latent)."),
    ae_steps: Optional[int] = typer.Option(None, help="Autoencoder training steps (default: the preset's)."),
    latent_umap: bool = typer.Option(True, help="UMAP of the latents in the encode stage's report."),
    tstr: bool = typer.Option(False, "--tstr", help="Evaluation: train on synthetic, test on real (minutes on CPU)."),
    sampler: str = typer.Option("auto", help="auto | ddim | ddpm | dpmpp2m | rflow | heun (as `meddiff generate`)."),
    classes: Optional[str] = typer.Option(None, help="zip/folder/kaggle: 'glob[=name],...' class folders to keep."),
    colour: str = typer.Option("auto", help="zip/folder/kaggle: auto | grey | rgb (as for `meddiff ingest`)."),
    bit_depth: Optional[int] = typer.Option(None, help="16-bit/int inputs: sensor bits (default: detected)."),
    window: Optional[str] = typer.Option(None, help="'lo,hi' percentiles: per-image window to 8 bits instead."),
    val_frac: float = typer.Option(0.1, help="zip/folder/kaggle: validation fraction per class."),
    test_frac: float = typer.Option(0.2, help="zip/folder/kaggle: test fraction per class (held-out reference)."),
    split_seed: int = typer.Option(0, help="zip/folder/kaggle: seed of the stratified train/val/test split."),
    splits: str = typer.Option("auto", help="zip/folder/kaggle: auto (train/, val/, test/ folders keep their split) "
                                            "| random (one stratified split of all)."),
    labels: Optional[str] = typer.Option(None, help="zip/folder/kaggle: a CSV of labels instead of class folders."),
    id_column: str = typer.Option("image", help="--labels: the column naming each image."),
    label_column: str = typer.Option("label", help="--labels: the column holding each image's class."),
    group_column: Optional[str] = typer.Option(None, help="--labels: a patient/lesion id column (one split each)."),
    group_pattern: Optional[str] = typer.Option(None, help="A regex on file paths whose match is the patient "
                                                           "(one split each), e.g. 'person\\d+'."),
    frames: str = typer.Option("first", help="Multi-frame files: first (a DICOM is skipped) | all (every frame "
                                             "an image)."),
    storage_root: Optional[str] = typer.Option(None, "--storage", envvar=storage.ENV_VAR, help="Storage root."),
) -> None:
    """Run the whole pipeline; stages whose output exists are skipped. Prints the verdict and where the report is."""
    from flows.pipeline import pipeline as pipeline_flow
    from meddiff.pipeline import PipelineConfig

    if per_class is None and total is None:
        per_class = 50
    features = tuple(f.strip() for f in eval_features.split(",") if f.strip()) if eval_features else None
    # validate up front (a clear one-line error instead of a failed flow run)
    PipelineConfig(dataset, size, medmnist_root, mode, preset, steps, batch_size,  # type: ignore[arg-type]
                   preview_steps, per_class, total, sample_steps=sample_steps, guidance=guidance, device=device,  # type: ignore[arg-type]
                   allow_cpu_fallback=allow_cpu_fallback, seed=seed, evaluate=evaluate,
                   eval_features=features, eval_max_images=eval_max_images, domain_steps=domain_steps,
                   objective=objective, latent=latent, ae_preset=ae_preset, ae_steps=ae_steps,  # type: ignore[arg-type]
                   latent_umap=latent_umap, tstr=tstr, sampler=sampler, classes=classes,  # type: ignore[arg-type]
                   colour=colour, bit_depth=bit_depth, window=window, val_frac=val_frac,  # type: ignore[arg-type]
                   test_frac=test_frac, split_seed=split_seed, splits=splits, labels=labels,  # type: ignore[arg-type]
                   id_column=id_column, label_column=label_column, group_column=group_column,
                   group_pattern=group_pattern, frames=frames).check()  # type: ignore[arg-type]
    with _patient_ephemeral_server(), _user_errors_in_one_line():
        out = pipeline_flow(storage_root=storage_root, dataset=dataset, size=size, medmnist_root=medmnist_root,
                   mode=mode, preset=preset, steps=steps, batch_size=batch_size, preview_steps=preview_steps,
                   per_class=per_class, total=total, sample_steps=sample_steps, guidance=guidance, device=device,
                   allow_cpu_fallback=allow_cpu_fallback, seed=seed, evaluate=evaluate,
                   eval_features=list(features) if features else None, eval_max_images=eval_max_images,
                   domain_steps=domain_steps, objective=objective, latent=latent, ae_preset=ae_preset,
                   ae_steps=ae_steps, latent_umap=latent_umap, tstr=tstr, sampler=sampler, classes=classes,
                   colour=colour, bit_depth=bit_depth, window=window, val_frac=val_frac, test_frac=test_frac,
                   split_seed=split_seed, splits=splits, labels=labels, id_column=id_column,
                   label_column=label_column, group_column=group_column, group_pattern=group_pattern,
                   frames=frames)
    width = max(len(s["stage"]) for s in out["stages"])  # 'train-autoencoder' in a latent pipeline
    for s in out["stages"]:
        typer.echo(f"{s['stage']:>{width}}: {'skipped (exists)' if s['existed'] else 'done':<16} {s['uri']}")
    if out.get("verdict"):  # the report's one-sentence verdict, so the terminal says whether the cohort is usable
        typer.echo(f"verdict: {out['verdict']}")
    typer.echo(f"report: {out['report_uri']}" if out["report_uri"] else f"cohort: {out['cohort_uri']}")
