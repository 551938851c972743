"""Generate a class-balanced synthetic cohort from a trained model.

Output ``<root>/cohorts/<cohort-id>/`` in the cohort format of :mod:`meddiff.cohorts`. Work
proceeds in shard-sized chunks; each chunk commits its shard and its manifest part atomically,
so a killed run, re-run, generates only what is missing. ``cohort.json`` is written last.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import __version__, storage
from .checkpoint import TrainedModel, load_model
from .cohorts import SHARD_PREFIX, manifest_table, parquet_bytes
from .diffusion import build_scheduler
from .errors import ArtifactError, MeddiffError
from .images import encode_png
from .records import content_hash, make_record, now_iso, sha256_bytes
from .samplers import (Sampler, classifier_free_guidance, initial_noise, sample_ddim, sample_rflow,
                       step_generators, to_uint8)
from .shards import encode_sample, write_shard

Progress = Callable[[int, int], None]
DEFAULT_GUIDANCE = 2.0  # CFG scale used for conditional models when the spec leaves it unset


@dataclass(frozen=True)
class CohortSpec:
    model_uri: str  # a complete model (model.json present)
    per_class: int | None = None  # N images of every class
    total: int | None = None  # N images: split evenly over classes, or by `ratios` when given
    ratios: str | None = None  # prevalence ratios "name=p,..." of `total` (unlisted classes get 0)
    sampler: Sampler | Literal["auto"] = "auto"  # auto = rflow for rectified-flow models, ddim (η=0) for DDPM
    # models; ddpm = ancestral (η=1)
    steps: int = 50  # reverse-diffusion steps
    guidance: float | None = None  # CFG scale (conditional models only); None = 2.0 for conditional models
    seed: int = 0  # base seed; sample i's seed derives from (seed, i)
    batch_size: int = 64  # images per forward pass (recorded: it can move an image's last bits)
    device: str = "auto"  # auto = cuda when available, else cpu
    shard_size: int = 1000  # images per shard = per resumable chunk
    name: str | None = None  # cohort id; None = <model run>-<content hash of the spec>

    def check(self) -> "CohortSpec":
        if self.sampler not in (*get_args(Sampler), "auto"):
            raise MeddiffError(f"unknown sampler {self.sampler!r}; choose auto or one of {get_args(Sampler)}")
        forms = sum(x is not None for x in (self.per_class, self.total))
        if forms != 1:
            raise MeddiffError("give exactly one of --per-class N or --total N (with optional --ratios)")
        if self.ratios is not None and self.total is None:
            raise MeddiffError("--ratios needs --total N: the ratios split that total")
        for label, n in (("--per-class", self.per_class), ("--total", self.total)):
            if n is not None and n <= 0:
                raise MeddiffError(f"{label} must be a positive count, got {n}")
        if self.steps < 1:
            raise MeddiffError(f"--steps must be ≥ 1, got {self.steps}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise MeddiffError("--batch-size and --shard-size must be positive")
        if self.guidance is not None and self.guidance < 0:
            raise MeddiffError(f"--guidance must be ≥ 0, got {self.guidance}")
        if self.name is not None and ("/" in self.name or "." in self.name or not self.name):
            raise MeddiffError(f"cohort name {self.name!r} must be a plain name without '/' or '.'")
        return self

    def quotas(self, class_names: list[str]) -> dict[str, int]:
        """Images per class, in class order; sums exactly to the requested total."""
        k = len(class_names)
        if self.per_class is not None:
            return {c: self.per_class for c in class_names}
        assert self.total is not None
        if self.ratios is None:
            weights = np.ones(k)
        else:
            weights = np.zeros(k)
            for name, p in parse_ratios(self.ratios):
                cid = int(name) if name.isdigit() and int(name) < k else (
                    class_names.index(name) if name in class_names else None)
                if cid is None:
                    raise MeddiffError(f"unknown class {name!r} in --ratios; classes are: {class_names} "
                                       "(names or 0-based ids)")
                weights[cid] = p
            if (weights < 0).any() or weights.sum() <= 0:
                raise MeddiffError("--ratios must be non-negative and not all zero")
        exact = weights / weights.sum() * self.total
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: self.total - counts.sum()]:  # largest remainder
            counts[i] += 1
        if self.ratios is None and (counts == 0).any():
            raise MeddiffError(f"--total {self.total} is smaller than the number of classes ({k})")
        return {c: int(n) for c, n in zip(class_names, counts)}


def parse_ratios(text: str) -> list[tuple[str, float]]:
    """``"a=0.7,b, c=0.3"`` → [("a", 0.7), ("b, c", 0.3)]: class names may contain commas, not '='."""
    import re

    parts = text.split("=")
    if len(parts) < 2:
        raise MeddiffError(f"--ratios must look like name=p,name=p; got {text!r}")
    out, name = [], parts[0].strip()
    for i, middle in enumerate(parts[1:]):
        last = i == len(parts) - 2
        m = re.fullmatch(r"\s*([-+0-9.eE]+)\s*" + ("" if last else r",(.*)"), middle, flags=re.S)
        if not m:
            raise MeddiffError(f"--ratios: cannot read a number after {name!r} in {text!r}")
        try:
            out.append((name, float(m.group(1))))
        except ValueError:
            raise MeddiffError(f"--ratios: {m.group(1)!r} (for {name!r}) is not a number") from None
        name = "" if last else m.group(2).strip()
    return out


@dataclass(frozen=True)
class CohortResult:
    uri: str  # the cohort's location: pass it to evaluate / cohorts verify
    card: dict
    existed: bool  # True when the complete cohort was already there (no work done)
    counts: dict[str, int]


def sample_seed(base_seed: int, sample_id: int) -> int:
    """Sample i's own seed: a hash of (base seed, i), so seeds of nearby samples are unrelated."""
    return int(np.random.SeedSequence([base_seed, sample_id]).generate_state(1, np.uint64)[0] >> 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MeddiffError("CUDA was requested but is not available on this machine; use --device cpu")
    return torch.device(device)


def resolve_sampler(spec: CohortSpec, model: TrainedModel) -> CohortSpec:
    """``sampler="auto"`` → the model's natural sampler: rflow for rectified flow, ddim for DDPM."""
    if spec.sampler != "auto":
        return spec
    return dataclasses.replace(spec, sampler="rflow" if model.objective == "rflow" else "ddim")


def check_compatible(spec: CohortSpec, model: TrainedModel) -> float | None:
    """The guidance scale to use; raises for a spec the model cannot serve."""
    if model.objective == "rflow" and spec.sampler != "rflow":
        raise MeddiffError(f"model {model.uri} was trained with rectified flow: use --sampler rflow")
    if model.objective == "ddpm" and spec.sampler == "rflow":
        raise MeddiffError(f"--sampler rflow needs a rectified-flow model; {model.uri} is a DDPM model: "
                           "use --sampler ddim or ddpm")
    limit = int(model.scheduler_config["num_train_timesteps"])
    if spec.steps > limit:
        raise MeddiffError(f"--steps {spec.steps} exceeds the model's {limit} training timesteps")
    if model.mode == "per-class":
        if spec.guidance is not None:
            raise MeddiffError("--guidance applies to conditional models; this model is per-class (unconditional)")
        return None
    return DEFAULT_GUIDANCE if spec.guidance is None else float(spec.guidance)


@torch.no_grad()
def generate_images(model: TrainedModel, class_ids: list[int], seeds: list[int], sampler: Sampler, steps: int,
                    guidance: float | None, device: torch.device, trace: list | None = None) -> torch.Tensor:
    """One batch: uint8 (B, C, H, W) images of ``class_ids`` from their own ``seeds``.

    Per-class models need a single class per batch (the caller groups them).
    """
    shape = (model.channels, model.image_size, model.image_size)
    x_T = initial_noise(seeds, shape, device)  # (B, C, H, W)
    if model.mode == "conditional":
        y = torch.tensor(class_ids, device=device)
        denoise = classifier_free_guidance(model.networks[None], y, model.null_class, guidance)
    else:
        (cid,) = set(class_ids)
        net = model.networks[cid]
        denoise = lambda x, t: net(x, timesteps=t, class_labels=None)  # noqa: E731
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    scheduler = build_sampler_scheduler(model, sampler)
    with autocast:
        if sampler == "rflow":
            x0 = sample_rflow(denoise, x_T, scheduler, steps, trace)
        else:
            x0 = sample_ddim(denoise, x_T, scheduler, steps, 1.0 if sampler == "ddpm" else 0.0,
                             step_generators(seeds, device), trace)
    return to_uint8(x0).cpu()


def build_sampler_scheduler(model: TrainedModel, sampler: Sampler):
    """MONAI scheduler for sampling: the training schedule, as DDIM for ddpm/ddim samplers."""
    if sampler == "rflow":
        return build_scheduler(model.scheduler_config)
    from monai.networks.schedulers import DDIMScheduler

    cfg = model.scheduler_config
    return DDIMScheduler(num_train_timesteps=cfg["num_train_timesteps"], schedule=cfg["schedule"],
                         prediction_type=cfg["prediction_type"], clip_sample=True)


def _plan(spec: CohortSpec, model: TrainedModel) -> tuple[dict[str, int], np.ndarray]:
    """Quotas and the class of every sample id (class-major order)."""
    quotas = spec.quotas(model.class_names)
    class_of = np.concatenate([np.full(n, i, dtype=np.int64) for i, n in enumerate(quotas.values())])
    return quotas, class_of


def identity(spec: CohortSpec, model: TrainedModel, quotas: dict[str, int], guidance: float | None) -> dict:
    """What determines the cohort's bytes. Batch size is in: CPU/GPU kernels choose their blocking by
    batch size, so it can move the last bits of an image (at most ±1 grey level on rare pixels)."""
    return {"model_uri": model.uri, "checkpoint_sha256": model.checkpoint_sha256, "quotas": quotas,
            "sampler": spec.sampler, "steps": spec.steps, "guidance": guidance, "seed": spec.seed,
            "shard_size": spec.shard_size, "batch_size": spec.batch_size}


def generate(spec: CohortSpec, root: str | None = None, progress: Progress | None = None) -> CohortResult:
    """Generate (or resume, or find) the cohort described by ``spec``."""
    spec = spec.check()
    root = storage.storage_root(root)
    device = resolve_device(spec.device)
    model = load_model(spec.model_uri, str(device))
    spec = resolve_sampler(spec, model)
    guidance = check_compatible(spec, model)
    quotas, class_of = _plan(spec, model)
    ident = identity(spec, model, quotas, guidance)
    cohort_id = spec.name or f"{Path(model.uri).name}-{content_hash(ident)}"
    uri = storage.join(root, "cohorts", cohort_id)

    if storage.exists(storage.join(uri, "spec.json")):
        previous = storage.read_json(storage.join(uri, "spec.json"))
        if previous != ident:
            raise MeddiffError(f"cohort {cohort_id!r} already exists at {uri} with a different spec; "
                               "choose another --name or delete it")
        if storage.exists(storage.join(uri, "cohort.json")):
            card = storage.read_json(storage.join(uri, "cohort.json"))
            return CohortResult(uri, card, existed=True, counts=card["counts"])

    remote = storage.is_remote(uri)
    work = Path.home() / ".cache" / "meddiff" / "work" / "cohorts" / cohort_id if remote else Path(uri)
    work.mkdir(parents=True, exist_ok=True)
    storage.write_json(str(work / "spec.json"), ident)
    if remote:
        storage.write_json(storage.join(uri, "spec.json"), ident)

    t0 = time.time()
    n_total = len(class_of)
    shard_names = [f"{SHARD_PREFIX}-{k:06d}.tar" for k in range((n_total + spec.shard_size - 1) // spec.shard_size)]
    done = 0
    generated = 0
    for k, shard_name in enumerate(shard_names):
        ids = range(k * spec.shard_size, min(n_total, (k + 1) * spec.shard_size))
        part = work / "parts" / shard_name.replace(".tar", ".parquet")
        if part.exists() and (work / shard_name).exists():
            done += len(ids)
            continue
        base = done
        rows = _generate_shard(spec, model, guidance, device, list(ids), class_of, work / shard_name,
                               lambda n: progress and progress(base + n, n_total))
        storage.write_bytes(str(part), parquet_bytes(manifest_table(rows)))
        done += len(ids)
        generated += len(ids)

    table = pa.concat_tables([pq.read_table(work / "parts" / s.replace(".tar", ".parquet"))
                              for s in shard_names]).sort_by("sample_id")
    if table.column("sample_id").to_pylist() != list(range(n_total)):
        raise ArtifactError(f"cohort {uri} parts do not add up to {n_total} samples; delete {work} and re-run")
    storage.write_bytes(str(work / "manifest.parquet"), parquet_bytes(table))
    manifest = table.to_pandas()
    write_pictures(model, spec, guidance, device, manifest, work)
    seconds = time.time() - t0
    dataset_uri = (model.card.get("dataset") or {}).get("uri")  # the real data the model learned from
    card = make_record(
        "cohort", spec, inputs={"model_uri": model.uri, "checkpoint_sha256": model.checkpoint_sha256,
                                "dataset_uri": dataset_uri},
        cohort_id=cohort_id, uri=uri, model_uri=model.uri, dataset_uri=dataset_uri,
        model_mode=model.mode, class_names=model.class_names, counts=quotas, total=n_total,
        shards=shard_names, sampler=spec.sampler, steps=spec.steps, guidance_scale=guidance, seed=spec.seed,
        device=str(device), seconds=round(seconds, 2),
        samples_per_second=round(generated / seconds, 2) if generated and seconds > 0 else None,
        resumed_samples=n_total - generated,
    )
    storage.write_json(str(work / "cohort.json"), card)
    if remote:
        storage.publish_dir(work, uri, last=("cohort.json",))
        shutil.rmtree(work, ignore_errors=True)
    return CohortResult(uri, card, existed=False, counts=quotas)


def _batches(ids: list[int], class_of: np.ndarray, model: TrainedModel, batch_size: int) -> list[list[int]]:
    """Split sample ids into batches; per-class models get single-class batches."""
    if model.mode == "conditional":
        return [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
    out: list[list[int]] = []
    for cid in sorted(set(class_of[ids].tolist())):
        same = [i for i in ids if class_of[i] == cid]
        out += [same[i:i + batch_size] for i in range(0, len(same), batch_size)]
    return out


def _generate_shard(spec: CohortSpec, model: TrainedModel, guidance: float | None, device: torch.device,
                    ids: list[int], class_of: np.ndarray, shard_path: Path,
                    on_batch: Callable[[int], Any] = lambda n: None) -> list[dict[str, Any]]:
    """Generate and write one shard atomically; ``on_batch(images done in this shard)`` after each batch."""
    images: dict[int, np.ndarray] = {}
    for batch in _batches(ids, class_of, model, spec.batch_size):
        seeds = [sample_seed(spec.seed, i) for i in batch]
        out = generate_images(model, class_of[batch].tolist(), seeds, spec.sampler, spec.steps, guidance, device)
        for i, img in zip(batch, out.numpy()):
            images[i] = img
        on_batch(len(images))
    created = now_iso()
    rows, samples = [], []
    for i in ids:
        cid = int(class_of[i])
        name = model.class_names[cid]
        png = encode_png(images[i].transpose(1, 2, 0))  # (C, H, W) → (H, W, C)
        key = f"syn-{i:07d}"
        seed = sample_seed(spec.seed, i)
        ckpt = model.checkpoint_sha256.get("model") or model.checkpoint_sha256[name]
        samples.append(encode_sample(key, png, cid, {
            "label": cid, "label_name": name, "sample_id": i, "seed": seed, "model_uri": model.uri,
            "sampler": spec.sampler, "steps": spec.steps, "guidance_scale": guidance}))
        rows.append({"sample_id": i, "key": key, "shard": shard_path.name, "class_id": cid, "class_name": name,
                     "seed": seed, "model_uri": model.uri, "checkpoint_sha256": ckpt, "sampler": spec.sampler,
                     "steps": spec.steps, "guidance_scale": guidance, "image_sha256": sha256_bytes(png),
                     "created_at": created, "meddiff_version": __version__})
    write_shard(shard_path, samples)
    return rows


def regenerate(cohort_uri: str, sample_id: int, device: str = "auto", alone: bool = False) -> bytes:
    """PNG bytes of one sample of a cohort, regenerated from its own seed.

    By default the sample is recomputed inside the batch it was made in (rebuilt from the cohort
    card's quotas, shard size and batch size): the bytes are identical to the stored image.
    ``alone=True`` runs it as a batch of one: CPU math kernels pick their blocking by batch size,
    so the image then matches up to the last bits (at most ±1 grey level on rare pixels).
    """
    from .cohorts import open_cohort

    cohort = open_cohort(cohort_uri)
    card = cohort.card
    row = cohort.manifest().set_index("sample_id").loc[sample_id]
    dev = resolve_device(device)
    model = load_model(row["model_uri"], str(dev))
    guidance = None if pd.isna(row["guidance_scale"]) else float(row["guidance_scale"])
    batch = [sample_id]
    if not alone:
        class_of = np.concatenate([np.full(int(card["counts"][c]), i, dtype=np.int64)
                                   for i, c in enumerate(card["class_names"])])
        size, bs = int(card["config"]["shard_size"]), int(card["config"]["batch_size"])
        first = sample_id // size * size
        shard_ids = list(range(first, min(len(class_of), first + size)))
        batch = next(b for b in _batches(shard_ids, class_of, model, bs) if sample_id in b)
        rows = cohort.manifest().set_index("sample_id").loc[batch]
    else:
        rows = pd.DataFrame([row], index=[sample_id])
    imgs = generate_images(model, rows["class_id"].astype(int).tolist(), rows["seed"].astype(int).tolist(),
                           row["sampler"], int(row["steps"]), guidance, dev)
    return encode_png(imgs[batch.index(sample_id)].numpy().transpose(1, 2, 0))


def write_pictures(model: TrainedModel, spec: CohortSpec, guidance: float | None, device: torch.device,
                   manifest: pd.DataFrame, work: Path, per_class: int = 16, strip_samples: int = 4,
                   strip_frames: int = 8) -> None:
    """grids/class-<i>.png (first images of each class) and reverse_diffusion.png/.gif."""
    from .images import decode_png
    from .shards import iter_shard
    from .plots import image_grid, save_gif

    wanted = {cid: set(g["key"].head(per_class)) for cid, g in manifest.groupby("class_id")}
    found: dict[int, list[np.ndarray]] = {cid: [] for cid in wanted}
    for shard in sorted(manifest["shard"].unique()):
        for s in iter_shard(str(work / shard)):
            cid = int(s["cls"])
            if s["__key__"] in wanted.get(cid, ()):
                found[cid].append(decode_png(s["png"]))
    (work / "grids").mkdir(exist_ok=True)
    for cid, imgs in found.items():
        if imgs:
            storage.write_bytes(str(work / "grids" / f"class-{cid}.png"), image_grid(np.stack(imgs)))
    # reverse diffusion: the first sample of a few classes, regenerated with their trajectory recorded
    firsts = manifest.groupby("class_id").head(1).head(strip_samples)
    frames: list[np.ndarray] = []  # each (B, C, H, W) uint8
    for _, row in firsts.iterrows():
        trace: list[torch.Tensor] = []
        generate_images(model, [int(row.class_id)], [int(row.seed)], spec.sampler, spec.steps, guidance, device, trace)
        picks = np.linspace(0, len(trace) - 1, strip_frames).round().astype(int)
        frames.append(np.stack([to_uint8(trace[i])[0].numpy() for i in picks]))  # (F, C, H, W)
    if frames:
        strip = np.stack(frames)  # (S, F, C, H, W): a row per sample, noise → image left to right
        s, f = strip.shape[:2]
        storage.write_bytes(str(work / "reverse_diffusion.png"), image_grid(strip.reshape(s * f, *strip.shape[2:]), cols=f))
        storage.write_bytes(str(work / "reverse_diffusion.gif"), save_gif(strip.transpose(1, 0, 2, 3, 4)))
