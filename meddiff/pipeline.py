"""The whole job in one call: ingest → train → generate → evaluate.

Every stage is content-addressed (its output location is a hash of its inputs), so running the
pipeline again with the same configuration finds each output and does no work: each stage's
result says ``existed``. The Prefect flow ``pipeline`` (flows/pipeline.py) runs the same stages,
each as a Prefect task with retries, by passing its own ``call``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args

from meddiff import storage
from meddiff.data.pixel_survey import Colour, Frames
from meddiff.data.sources import SplitRule
from meddiff.devices import DeviceUnavailableError, resolve_device  # noqa: F401  (re-exported)
from meddiff.errors import COUNT_FORMS, MeddiffError
from meddiff.progress import Progress

Mode = Literal["conditional", "per-class"]
Device = Literal["auto", "cpu", "cuda"]
SamplerName = Literal["auto", "ddim", "ddpm", "dpmpp2m", "rflow", "heun"]  # meddiff.models.samplers.Sampler + auto
STAGES = ("ingest", "train-autoencoder", "encode", "train", "generate", "evaluate")  # the latent ones with --latent

# (stage name, function, *args) -> the function's result; the flow wraps each stage in a task
StageCall = Callable[..., Any]
# stage name -> a progress(done, total) callback for that stage (or None)
ProgressFactory = Callable[[str], Progress | None]


class PipelineError(MeddiffError):
    """The pipeline's configuration is invalid."""


@dataclass(frozen=True)
class PipelineConfig:
    dataset: str = "medmnist:bloodmnist"  # ingest source: medmnist:<flag> | kaggle:... | zip:... | folder:...
    size: int | None = None  # image side in px; None = the source's default (28 for MedMNIST)
    medmnist_root: str | None = None  # folder with already-downloaded MedMNIST .npz files (no download)
    mode: Mode = "conditional"  # one class-conditional model, or one model per class
    preset: str = "tiny"  # model/training size preset (tiny fits a 2-core CPU in minutes)
    steps: int | None = 800  # training steps (~100 s for tiny on 2 CPU cores); None = the preset's default
    batch_size: int | None = None  # training batch size; None = the preset's default
    preview_steps: int | None = None  # sampler steps of training's preview grids; None = training's default
    per_class: int | None = 50  # images generated per class (exclusive with total)
    total: int | None = None  # total images generated, split evenly over the classes (exclusive with per_class)
    sampler: SamplerName = "auto"  # generation sampler; auto = the
    # measured best for what the model predicts (heun for rectified flow, dpmpp2m for v, ddim for ε; bench/bench_samplers.py)
    sample_steps: int | None = None  # denoising steps per image (heun: 2·steps − 1 network calls); None = the
    # sampler's measured default (ddim 50, ddpm 100, others 25)
    guidance: float | None = None  # classifier-free guidance scale; None = the model's default
    device: Device = "auto"  # auto = GPU when present else CPU; cuda without a GPU fails
    allow_cpu_fallback: bool = False  # with device=cuda and no GPU: run on the CPU instead of failing
    seed: int = 0  # seed of training and of generation
    evaluate: bool = True  # run the evaluation stage (quality report) after generation
    # feature extractors of the evaluation's set metrics; None = inception + domain when the
    # InceptionV3 weights are installed (extra `inception`), else domain only
    eval_features: tuple[str, ...] | None = None
    # images per set (synthetic/train/val) through Inception; None = all. 300 (≥ evaluate's reliable_n=250)
    # keeps the CPU main job within 10 minutes: Inception is its slowest part (~0.15 s/image on 2 cores)
    eval_max_images: int | None = 300
    domain_steps: int | None = None  # optimizer steps of the evaluation's domain classifier; None = its default
    objective: Literal["ddpm", "rflow"] = "rflow"  # rectified flow: recognisable cells from `tiny` on a CPU
    latent: Literal["vae", "vqvae"] | None = None  # latent diffusion: train this autoencoder, encode, train on latents
    ae_preset: str = "tiny"  # autoencoder preset (meddiff.models.autoencoders.AE_PRESETS)
    ae_steps: int | None = None  # autoencoder training steps; None = the preset's default
    latent_umap: bool = True  # the encode stage's UMAP of the latents (umap-learn's first call compiles: ~1 min)
    tstr: bool = False  # evaluation: train on synthetic, test on real (four small classifiers; minutes on a CPU)
    # ingest options for zip/folder/Kaggle sources (as `meddiff ingest` takes them)
    classes: str | None = None  # "glob[=name],..." class folders to keep/rename; None = every class folder
    colour: Colour = "auto"  # auto = 1 channel unless an image holds colour; grey / rgb force
    bit_depth: int | None = None  # >8-bit integer inputs: sensor bits; None = detected
    window: str | None = None  # "lo,hi" percentiles: per-image window to 8 bits instead of the bit depth
    val_frac: float = 0.1  # zip/folder/Kaggle: validation fraction per class (as `meddiff ingest --val-frac`)
    test_frac: float = 0.2  # zip/folder/Kaggle: test fraction per class (the evaluation's held-out reference)
    split_seed: int = 0  # zip/folder/Kaggle: seed of the stratified train/val/test split
    splits: SplitRule = "auto"  # zip/folder/Kaggle: auto = published split folders kept; random = re-split all
    labels: str | None = None  # zip/folder/Kaggle: a label CSV (in the source, or on disk); None = class folders
    id_column: str = "image"  # --labels: the column naming each image (its path in the source, or file stem)
    label_column: str = "label"  # --labels: the column holding each image's class
    group_column: str | None = None  # --labels: a patient/lesion id column; a group's images share one split
    group_pattern: str | None = None  # regex on each file's path: its match is the patient (one split each)
    frames: Frames = "first"  # multi-frame files: the first page (a DICOM is skipped), or every frame an image

    def check(self) -> "PipelineConfig":
        if self.objective not in ("ddpm", "rflow"):
            raise PipelineError(f"objective must be ddpm or rflow, got {self.objective!r}")
        if self.mode not in get_args(Mode):
            raise PipelineError(f"mode must be one of {', '.join(get_args(Mode))}, got {self.mode!r}")
        if self.device not in get_args(Device):
            raise PipelineError(f"device must be one of {', '.join(get_args(Device))}, got {self.device!r}")
        if (self.per_class is None) == (self.total is None):
            raise PipelineError(COUNT_FORMS)
        for name in ("per_class", "total", "steps", "batch_size", "preview_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PipelineError(f"{name} must be positive, got {value}")
        if self.eval_max_images is not None and self.eval_max_images < 2:
            raise PipelineError(f"eval_max_images must be at least 2, got {self.eval_max_images}")
        if self.domain_steps is not None and self.domain_steps < 1:
            raise PipelineError(f"domain_steps must be positive, got {self.domain_steps}")
        if self.sampler not in get_args(SamplerName):
            raise PipelineError(f"sampler must be one of {', '.join(get_args(SamplerName))}, got {self.sampler!r}")
        if self.latent not in (None, "vae", "vqvae"):
            raise PipelineError(f"latent must be vae or vqvae, got {self.latent!r}")
        if self.ae_steps is not None and self.ae_steps < 1:
            raise PipelineError(f"ae_steps must be positive, got {self.ae_steps}")
        if self.sample_steps is not None and self.sample_steps < 1:
            raise PipelineError(f"sample_steps must be positive, got {self.sample_steps}")
        if self.size is not None:  # refused before ingest writes (2.6 GB extracted for BloodMNIST at 224 px)
            self._check_size()
        self.ingest_config().check()  # --classes, --colour, --window, … refused before any stage runs
        return self

    def _check_size(self) -> None:
        """``size`` fits the preset the pipeline trains (the autoencoder's, for latent diffusion)."""
        if self.latent:
            from meddiff.models.autoencoders import get_ae_preset

            which, sizes = f"autoencoder preset {self.ae_preset!r}", get_ae_preset(self.ae_preset).image_sizes
        else:
            from meddiff.train.presets import get_preset

            which, sizes = f"preset {self.preset!r}", get_preset(self.preset).image_sizes
        if self.size not in sizes:
            raise PipelineError(f"size must be one of {list(sizes)} for {which}, got {self.size}")

    def ingest_config(self):
        from meddiff.data.ingest import IngestConfig

        return IngestConfig(self.dataset, size=self.size, medmnist_root=self.medmnist_root, classes=self.classes,
                            colour=self.colour, bit_depth=self.bit_depth, window=self.window,
                            val_frac=self.val_frac, test_frac=self.test_frac, split_seed=self.split_seed,
                            splits=self.splits, labels=self.labels, id_column=self.id_column,
                            label_column=self.label_column, group_column=self.group_column,
                            group_pattern=self.group_pattern, frames=self.frames)

    def train_config(self, dataset_uri: str, device: str, latent: str | None = None):
        from meddiff.train import TrainConfig

        extra = {} if self.preview_steps is None else {"preview_steps": self.preview_steps}
        return TrainConfig(dataset_uri, mode=self.mode, preset=self.preset, steps=self.steps,
                           batch_size=self.batch_size, device=device, seed=self.seed, objective=self.objective,
                           latent=latent, **extra)

    def autoencoder_config(self, dataset_uri: str, device: str):
        from meddiff.train.ae_config import AETrainConfig

        kind: Any = self.latent
        return AETrainConfig(dataset_uri, kind=kind, preset=self.ae_preset, steps=self.ae_steps, device=device,
                             seed=self.seed)

    def cohort_spec(self, model_uri: str, device: str):
        from meddiff.generate import CohortSpec

        return CohortSpec(model_uri, per_class=self.per_class, total=self.total, sampler=self.sampler,
                          steps=self.sample_steps, guidance=self.guidance, seed=self.seed, device=device)

    def eval_config(self, device: str):
        from meddiff.evaluate import EvalConfig
        from meddiff.evaluate.features import DomainTrainConfig

        domain = DomainTrainConfig() if self.domain_steps is None else DomainTrainConfig(steps=self.domain_steps)
        return EvalConfig(features=self.resolved_eval_features(), max_images=self.eval_max_images, domain=domain,
                          device=device, seed=self.seed, tstr=self.tstr)

    def resolved_eval_features(self) -> tuple[str, ...]:
        if self.eval_features is not None:
            return tuple(self.eval_features)
        from meddiff.evaluate.features import find_inception_weights

        try:
            find_inception_weights()
        except MeddiffError:
            return ("domain",)
        return ("inception", "domain")


@dataclass(frozen=True)
class StageOutcome:
    stage: str  # ingest | train-autoencoder | encode | train | generate | evaluate
    uri: str  # the stage's output: dataset, model, cohort, or report location
    existed: bool | None  # True: found complete and skipped; None: the stage does not say


@dataclass(frozen=True)
class PipelineResult:
    dataset_uri: str
    model_uri: str
    cohort_uri: str
    report_uri: str | None  # None when evaluation was switched off
    stages: list[StageOutcome] = field(default_factory=list)
    verdict: str | None = None  # the report's one-sentence verdict ("Fit for use …" / "Not fit for use: …")

    @property
    def all_skipped(self) -> bool:
        return all(s.existed for s in self.stages)

    def to_dict(self) -> dict:
        return {"dataset_uri": self.dataset_uri, "model_uri": self.model_uri, "cohort_uri": self.cohort_uri,
                "report_uri": self.report_uri, "verdict": self.verdict,
                "stages": [{"stage": s.stage, "uri": s.uri, "existed": s.existed} for s in self.stages]}


def _direct(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _latent_stages(cfg: PipelineConfig, dataset_uri: str, root: str, device: str, call: StageCall,
                   progress: ProgressFactory, record: Callable[[str, str, bool | None], None],
                   log: Callable[[str], None]) -> str:
    """train-autoencoder, then encode (latent shards + reconstruction report, logged); returns the AE URI."""
    from meddiff.evaluate.reconstruction import encode_with_report, summary_lines
    from meddiff.train.autoencoder import train_autoencoder

    ae = call("train-autoencoder", train_autoencoder, cfg.autoencoder_config(dataset_uri, device), root,
              progress("train-autoencoder"))
    record("train-autoencoder", ae.uri, ae.existed)
    enc = call("encode", encode_with_report, dataset_uri, ae.uri, device, 1000, root, cfg.domain_steps,
               cfg.latent_umap, None, progress("encode"))
    record("encode", enc["uri"], enc["existed"])
    for line in summary_lines(enc["card"]["reconstruction"]):
        log(f"encode: {line}")
    return ae.uri


def _check_evaluable(uri: str, card: dict) -> None:
    from meddiff.evaluate.loading import check_evaluable

    try:
        check_evaluable(uri, card["totals"])
    except MeddiffError as e:
        raise PipelineError(f"{e}: found before training; give the source more images (each split takes a share "
                            "of every class), raise --val-frac / --test-frac, or run with --no-evaluate") from None


def run_pipeline(cfg: PipelineConfig, root: str | None = None, progress: ProgressFactory | None = None,
                 call: StageCall | None = None, log: Callable[[str], None] | None = None) -> PipelineResult:
    """Run ingest → train → generate → evaluate under the storage root; stages with outputs are skipped.

    ``progress(stage)`` gives each stage its progress callback; ``call(stage, fn, *args)`` runs a
    stage (default: directly; the Prefect flow runs each as a task); ``log`` receives one line per stage.
    """
    from meddiff.evaluate import evaluate_cohort
    from meddiff.generate import generate
    from meddiff.data.ingest import ingest
    from meddiff.data.shards import empty_splits, label_summary, split_note
    from meddiff.train import train

    cfg = cfg.check()
    root = storage.check_reachable(root)
    device = resolve_device(cfg.device, allow_cpu_fallback=cfg.allow_cpu_fallback,
                            fallback_switch="allow_cpu_fallback / --allow-cpu-fallback").type
    call = call or _direct
    progress = progress or (lambda stage: None)
    log = log or (lambda line: None)
    stages: list[StageOutcome] = []

    def record(stage: str, uri: str, existed: bool | None) -> None:
        stages.append(StageOutcome(stage, uri, existed))
        log(f"{stage}: {'skipped, output exists' if existed else 'done'} → {uri}")

    ds = call("ingest", ingest, cfg.ingest_config().check(), root, progress("ingest"))
    record("ingest", ds.uri, ds.existed)
    if note := split_note(ds.card):  # published split folders or groups: worth saying
        log(f"ingest: {note}")
    if labels := label_summary(ds.card):
        log(f"ingest: labels: {labels}")
    for warning in empty_splits(ds.card):  # a class too small for a split: evaluation cannot judge it there
        log(f"ingest: warning: {warning}")
    if cfg.evaluate:  # found now, not after training and generating
        _check_evaluable(ds.uri, ds.card)
    ae_uri = _latent_stages(cfg, ds.uri, root, device, call, progress, record, log) if cfg.latent else None
    model = call("train", train, cfg.train_config(ds.uri, device, ae_uri), root, progress("train"))
    record("train", model.uri, model.existed)
    cohort = call("generate", generate, cfg.cohort_spec(model.uri, device), root, progress("generate"))
    record("generate", cohort.uri, cohort.existed)
    report_uri = verdict = None
    if cfg.evaluate:
        log(f"evaluate: features {', '.join(cfg.resolved_eval_features())}")
        report = call("evaluate", evaluate_cohort, cohort.uri, cfg.eval_config(device), progress("evaluate"))
        report_uri, verdict = report.report_uri, report.report["verdict"]["sentence"]
        record("evaluate", report_uri, getattr(report, "existed", None))
    return PipelineResult(ds.uri, model.uri, cohort.uri, report_uri, stages, verdict)
