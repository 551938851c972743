"""Prefect flow ``pipeline``: ingest → train → generate → evaluate, each stage a task with retries.

The stages are :func:`meddiff.pipeline.run_pipeline`'s; this flow only runs each one as a Prefect
task (retried on transient I/O errors), with a progress artifact per stage and progress lines in
the run logger. Stages whose output already exists are skipped (content-addressed outputs).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import (MEDMNIST_ENV, RESULT_OPTIONS, artifact_key, dataset_tag, explain_wait, from_env, link_url,
                          LoggedProgress, one_traceback_per_failure, phrased, prefect_progress, publish_link,
                          retry_transient, tag_run, user_errors)
from flows.generate_cohort import SamplerChoice
from flows.train_model import PresetName
from meddiff.data.pixel_survey import Colour, Frames
from meddiff.data.sources import SplitRule
from meddiff.pipeline import PipelineConfig, PipelineResult, run_pipeline
from meddiff.progress import combine

_D = PipelineConfig()  # the library's defaults: the flow restates them (tests/test_flow_defaults.py)
# object storage and downloads are retried with backoff; training is not (it resumes from checkpoints)
RETRIES = {"ingest": 2, "train-autoencoder": 1, "encode": 2, "train": 1, "generate": 2, "evaluate": 2}
# the unit of each stage's progress lines (steps print bare); every stage that takes a progress callback
UNITS = {"ingest": " images", "train-autoencoder": "", "encode": " images", "train": "", "generate": " images",
         "evaluate": " stages"}


def run_name() -> str:
    """``pipeline-<dataset>``."""
    from prefect.runtime import flow_run

    return f"pipeline-{dataset_tag(flow_run.parameters.get('dataset', _D.dataset)).split(':', 1)[1]}"


def run_as_task(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    retries = RETRIES.get(stage, 0)
    if stage == "evaluate":
        from flows.evaluate_cohort import describe_plan

        get_run_logger().info(describe_plan(args[0], args[1]))
    # no Prefect result caching: the stages' outputs are content-addressed and found by the library
    return task(phrased(fn), name=stage, retries=retries, retry_delay_seconds=[5, 30][:retries] or 0,
                retry_condition_fn=retry_transient, cache_policy=NO_CACHE)(*args)


def result_markdown(result: PipelineResult) -> str:
    lines = ["# Pipeline", "", "| stage | output | skipped |", "|---|---|---|"]
    lines += [f"| {s.stage} | [{s.uri}]({link_url(s.uri)}) | {'yes' if s.existed else 'no'} |" for s in result.stages]
    if result.verdict:
        lines += ["", f"**Verdict:** {result.verdict}"]
    return "\n".join(lines)


@flow(name="pipeline", flow_run_name=run_name, **RESULT_OPTIONS)
def pipeline(
    dataset: str = _D.dataset,
    size: int | None = _D.size,
    medmnist_root: str | None = _D.medmnist_root,
    mode: Literal["conditional", "per-class"] = _D.mode,
    preset: PresetName = _D.preset,
    steps: int | None = _D.steps,
    batch_size: int | None = _D.batch_size,
    preview_steps: int | None = _D.preview_steps,
    per_class: int | None = _D.per_class,
    total: int | None = _D.total,
    sampler: SamplerChoice = _D.sampler,
    sample_steps: int | None = _D.sample_steps,
    guidance: float | None = _D.guidance,
    device: Literal["auto", "cpu", "cuda"] = _D.device,
    allow_cpu_fallback: bool = _D.allow_cpu_fallback,
    seed: int = _D.seed,
    evaluate: bool = _D.evaluate,
    eval_features: list[Literal["inception", "domain"]] | None = _D.eval_features,
    eval_max_images: int | None = _D.eval_max_images,
    domain_steps: int | None = _D.domain_steps,
    objective: Literal["ddpm", "rflow"] = _D.objective,
    storage_root: str | None = None,
    latent: Literal["vae", "vqvae"] | None = _D.latent,
    ae_preset: str = _D.ae_preset,
    ae_steps: int | None = _D.ae_steps,
    latent_umap: bool = _D.latent_umap,
    tstr: bool = _D.tstr,
    classes: str | None = _D.classes,
    colour: Colour = _D.colour,
    bit_depth: int | None = _D.bit_depth,
    window: str | None = _D.window,
    val_frac: float = _D.val_frac,
    test_frac: float = _D.test_frac,
    split_seed: int = _D.split_seed,
    splits: SplitRule = _D.splits,
    labels: str | None = _D.labels,
    id_column: str = _D.id_column,
    label_column: str = _D.label_column,
    group_column: str | None = _D.group_column,
    group_pattern: str | None = _D.group_pattern,
    frames: Frames = _D.frames,
) -> dict:
    """The whole job: a dataset source in, a synthetic cohort and its quality report out.

    Returns (and persists) ``{"dataset_uri", "model_uri", "cohort_uri", "report_uri", "stages"}``.

    Args:
        dataset: Ingest source: medmnist:<flag> (e.g. medmnist:bloodmnist), kaggle:<owner>/<slug>, zip:<path>, folder:<path>.
        size: Image side in px; empty = the source's default (28 for MedMNIST).
        medmnist_root: Folder with already-downloaded MedMNIST .npz files; empty = the worker's MEDMNIST_ROOT, else download from zenodo.
        mode: One class-conditional model, or one model per class.
        preset: Model/training size: tiny fits a 2-core CPU in minutes.
        steps: Training steps; empty = the preset's default.
        batch_size: Training batch size; empty = the preset's default.
        preview_steps: Sampler steps of training's preview grids; empty = training's default.
        per_class: Images generated per class (give this or total).
        total: Total images, split evenly over the classes (give this or per_class).
        sampler: Generation sampler; auto = the measured best for what the model predicts (dpmpp2m for v-prediction DDPM, ddim for ε, heun for rectified flow); or ddim, ddpm, dpmpp2m, rflow, heun.
        sample_steps: Denoising steps per generated image; empty = the sampler's measured default.
        guidance: Classifier-free guidance scale; empty = the model's default (2.0).
        device: auto = a GPU when the worker has one, else CPU; cuda without a GPU fails.
        allow_cpu_fallback: With device=cuda and no GPU: run on the CPU instead of failing.
        seed: Seed of training and of generation.
        evaluate: Run the evaluation stage (quality report) after generation.
        eval_features: Feature extractors of the evaluation; empty = inception + domain when the Inception weights are installed, else domain.
        eval_max_images: Images per set (synthetic/train/val) through Inception; empty = all.
        domain_steps: Optimizer steps of the evaluation's domain classifier; empty = its default.
        objective: rflow (rectified flow: recognisable cells from tiny on a CPU) or ddpm.
        latent: Latent diffusion: train this autoencoder (vae or vqvae), encode the dataset, train on its latents; empty = pixels.
        ae_preset: Autoencoder preset (tiny, small, base) when latent is set.
        ae_steps: Autoencoder training steps; empty = the preset's default.
        latent_umap: Draw the encode stage's UMAP of the latents (umap-learn's first call compiles for ~1 min).
        tstr: Evaluation: train on synthetic, test on real (four small classifiers: real, real at the cohort's n,
            synthetic, both).
        storage_root: Storage root (folder or s3://bucket/prefix); empty = the worker's MEDDIFF_STORAGE, else ./storage.
        classes: zip/folder/kaggle: "glob[=name],..." class folders to keep and rename; empty = every class folder.
        colour: zip/folder/kaggle: auto (1 channel unless an image holds colour), grey or rgb.
        bit_depth: 16-bit/integer inputs: the sensor's bits, e.g. 12; empty = detected from the dataset.
        window: "lo,hi" percentiles, e.g. "0.5,99.5": a per-image window to 8 bits instead of the bit depth.
        val_frac: zip/folder/kaggle: validation fraction per class.
        test_frac: zip/folder/kaggle: test fraction per class (the evaluation's held-out reference).
        split_seed: zip/folder/kaggle: seed of the stratified train/val/test split.
        splits: zip/folder/kaggle: auto = class folders inside published split folders (train/, val/, test/) keep that split; random = one stratified split of all.
        labels: zip/folder/kaggle: a CSV of labels instead of class folders (a file inside the source, or a path on the worker).
        id_column: With labels: the column naming each image (its path inside the source, or its file name without extension).
        label_column: With labels: the column holding each image's class.
        group_column: With labels: a patient/lesion id column; each group's images go to one split.
        group_pattern: zip/folder/kaggle: a regex on each file's path whose match (its first group, if any) is the patient, e.g. 'person\\d+'; each patient's images go to one split.
        frames: Multi-frame files (TIFF stacks, GIFs, DICOM volumes or clips): first (a DICOM is skipped) or all (every frame an image, a file's frames in one split).
    """
    one_traceback_per_failure()
    explain_wait()
    logger = get_run_logger()
    tag_run(dataset_tag(dataset))
    if dataset.startswith("medmnist:"):  # the worker's MEDMNIST_ROOT, as the CLI reads it
        medmnist_root = from_env(medmnist_root, MEDMNIST_ENV)
    cfg = PipelineConfig(dataset, size, medmnist_root, mode, preset, steps, batch_size, preview_steps, per_class, total,
                         sampler, sample_steps, guidance, device, allow_cpu_fallback, seed, evaluate,
                         tuple(eval_features) if eval_features else None, eval_max_images, domain_steps, objective,
                         latent, ae_preset, ae_steps, latent_umap, tstr, classes, colour, bit_depth, window,
                         val_frac, test_frac, split_seed, splits, labels, id_column, label_column,
                         group_column, group_pattern, frames)

    def progress(stage: str):
        logged = LoggedProgress(logger, stage, UNITS[stage], even=stage != "evaluate")  # its stages are unequal
        return combine(prefect_progress(f"{stage} ({dataset})"), logged)

    with user_errors():
        result = run_pipeline(cfg, storage_root, progress, call=run_as_task, log=logger.info)
    create_markdown_artifact(result_markdown(result), key=artifact_key("pipeline", dataset),
                             description="pipeline outputs")
    name = result.cohort_uri.rstrip("/").rsplit("/", 1)[-1]
    for kind, uri in (("dataset", result.dataset_uri), ("model", result.model_uri), ("cohort", result.cohort_uri)):
        publish_link(kind, uri, uri.rstrip("/").rsplit("/", 1)[-1])
    if result.report_uri:
        publish_link("report", result.report_uri.rsplit("/", 1)[0] + "/report.html", name)
    if result.verdict:
        logger.info("verdict: %s", result.verdict)
    logger.info("report: %s", result.report_uri)
    return result.to_dict()
