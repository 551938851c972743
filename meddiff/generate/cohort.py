"""Generate a class-balanced synthetic cohort from a trained model.

Output ``<root>/cohorts/<cohort-id>/`` in the cohort format of :mod:`meddiff.data.cohorts`. Work
proceeds in shard-sized chunks; each chunk commits its shard and its manifest part atomically,
so a killed run, re-run, generates only what is missing. ``cohort.json`` is written last.
"""

from __future__ import annotations

import io
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from meddiff import __version__, storage
from meddiff.data.images import encode_png
from meddiff.data.shards import encode_sample, write_shard
from meddiff.devices import cuda_count, resolve_device
from meddiff.locks import artifact_lock, tell_waiting
from meddiff.threads import configure_threads
from meddiff.errors import ArtifactError, Interrupted, MeddiffError
from meddiff.data.cohorts import SHARD_PREFIX, UNKNOWN_CLASS, WRITE_ORDER, manifest_table, open_cohort, parquet_bytes, write_order
from meddiff.generate.pictures import write_pictures
from meddiff.generate.sampling import check_compatible, generate_images, precision, resolve_sampler
from meddiff.generate.spec import CohortResult, CohortSpec
from meddiff.models.trained import TrainedModel, load_model
from meddiff.progress import Progress, tell
from meddiff.records import content_hash, make_record, now_iso, sha256_bytes


def sample_seed(base_seed: int, sample_id: int) -> int:
    """Sample i's own seed: a hash of (base seed, i), so seeds of nearby samples are unrelated."""
    return int(np.random.SeedSequence([base_seed, sample_id]).generate_state(1, np.uint64)[0] >> 1)


def sample_classes(counts: dict[str, int], class_names: list[str]) -> np.ndarray:
    """The class id of every sample id (N,), class-major in ``counts``' order; ``UNKNOWN_CLASS`` (an
    unconditional cohort's one quota) is -1, the null label."""
    ids = [-1 if c == UNKNOWN_CLASS else class_names.index(c) for c in counts]
    return np.concatenate([np.full(int(n), i, dtype=np.int64) for i, n in zip(ids, counts.values())])


def _plan(spec: CohortSpec, model: TrainedModel) -> tuple[dict[str, int], np.ndarray]:
    """Quotas and the class of every sample id (class-major order)."""
    quotas = spec.quotas(model.class_names)
    return quotas, sample_classes(quotas, model.class_names)


def identity(spec: CohortSpec, model: TrainedModel, quotas: dict[str, int], guidance: float | None,
             device: torch.device) -> dict:
    """What determines the cohort's bytes. Batch size is in: CPU/GPU kernels choose their blocking by
    batch size, so it can move the last bits of an image (at most ±1 grey level on rare pixels); so are
    the device type and the network's autocast dtype, so a cohort never mixes CPU- and GPU-made shards.
    The model is named by its run id, its bytes pinned by the checkpoint's sha256: not by its URI, so the
    cohort's id does not depend on where the storage is mounted (another clone, worker or bucket path)."""
    return {"model": Path(model.uri).name, "checkpoint_sha256": model.checkpoint_sha256, "quotas": quotas,
            "sampler": spec.sampler, "steps": spec.steps, "guidance": guidance, "seed": spec.seed,
            "shard_size": spec.shard_size, "batch_size": spec.batch_size, **precision(device),
            "write_order": WRITE_ORDER, **({"unconditional": True} if spec.unconditional else {})}


def legacy_identity(ident: dict, model: TrainedModel) -> dict:
    """``ident`` as cohorts made before 2026-12-06 recorded it: the model by its URI (so that such a
    cohort is still found, and resumed, where its storage has not moved)."""
    return {"model_uri": model.uri, **{k: v for k, v in ident.items() if k != "model"}}


@dataclass(frozen=True)
class CohortPlan:
    """A checked cohort request: the model, what each sample id is, and where the shards go."""

    spec: CohortSpec  # sampler resolved
    model: TrainedModel
    device: torch.device
    guidance: float | None
    quotas: dict[str, int]
    class_of: np.ndarray  # (N,) class id of every sample id
    order: np.ndarray  # (N,) sample ids in write order (classes interleaved): shard k holds order[k·size:(k+1)·size]
    ident: dict  # what determines the cohort's bytes (spec.json)
    cohort_id: str
    uri: str
    work: Path  # where shards are built: the cohort folder itself, or a local work folder for remote roots

    @property
    def shard_names(self) -> list[str]:
        n, size = len(self.class_of), self.spec.shard_size
        return [f"{SHARD_PREFIX}-{k:06d}.tar" for k in range((n + size - 1) // size)]

    def shard_ids(self, k: int) -> list[int]:
        return self.order[k * self.spec.shard_size:(k + 1) * self.spec.shard_size].tolist()

    def part_path(self, k: int) -> Path:
        return self.work / "parts" / self.part_name(k)

    def part_name(self, k: int) -> str:
        return self.shard_names[k].replace(".tar", ".parquet")

    def shard_done(self, k: int) -> bool:
        """Shard k and its part are committed: locally, or (remote roots) at the cohort URI, part last."""
        if storage.is_remote(self.uri):
            return (storage.exists(storage.join(self.uri, "parts", self.part_name(k)))
                    and storage.exists(storage.join(self.uri, self.shard_names[k])))
        return self.part_path(k).exists() and (self.work / self.shard_names[k]).exists()


def plan_cohort(spec: CohortSpec, root: str | None = None) -> CohortPlan | CohortResult:
    """Check ``spec`` against its model; a ``CohortResult`` when the complete cohort already exists."""
    spec = spec.check()
    root = storage.storage_root(root)
    device = resolve_device(spec.device)
    model = load_model(spec.model_uri, str(device))
    spec = resolve_sampler(spec, model)
    guidance = check_compatible(spec, model)
    quotas, class_of = _plan(spec, model)
    ident = identity(spec, model, quotas, guidance, device)
    legacy, run = legacy_identity(ident, model), Path(model.uri).name
    legacy_id = f"{run}-{content_hash(legacy)}"  # a cohort made (or begun) before the id stopped naming the model's URI
    cohort_id = spec.name or f"{run}-{content_hash(ident)}"
    if not spec.name and storage.exists(storage.join(root, "cohorts", legacy_id, "spec.json")):
        cohort_id = legacy_id
    uri = storage.join(root, "cohorts", cohort_id)
    if storage.exists(storage.join(uri, "spec.json")):
        if storage.read_json(storage.join(uri, "spec.json")) not in (ident, legacy):
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
    return CohortPlan(spec, model, device, guidance, quotas, class_of, write_order(class_of, spec.seed), ident,
                      cohort_id, uri, work)


def generate_shard(plan: CohortPlan, k: int, on_batch: Callable[[int], Any] = lambda n: None) -> bool:
    """Generate shard ``k`` and its manifest part (each written atomically); False when it was done."""
    if plan.shard_done(k):
        return False
    configure_threads(load_aware=False)  # the machine's CPUs, not the moment's load: same bits on every worker
    rows = _generate_shard(plan.spec, plan.model, plan.guidance, plan.device, plan.shard_ids(k), plan.class_of,
                           plan.work / plan.shard_names[k], on_batch)
    storage.write_bytes(str(plan.part_path(k)), parquet_bytes(manifest_table(rows)))
    if storage.is_remote(plan.uri):  # publish per shard, so another worker's finish can merge it
        _upload(plan.work / plan.shard_names[k], storage.join(plan.uri, plan.shard_names[k]))
        _upload(plan.part_path(k), storage.join(plan.uri, "parts", plan.part_name(k)))  # the part last
    return True


def _upload(local: Path, uri: str) -> None:
    """Upload one finished local file to ``uri`` (a single PUT: atomic on S3), then delete the local copy."""
    fs, path = storage.filesystem(uri)
    storage.with_retries(lambda: fs.put_file(str(local), path), what=f"upload to {uri}")
    local.unlink()


def _read_part(plan: CohortPlan, k: int) -> pa.Table:
    if storage.is_remote(plan.uri):
        return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(plan.uri, "parts", plan.part_name(k)))))
    return pq.read_table(plan.part_path(k))


def finish_cohort(plan: CohortPlan, generated: int = 0, seconds: float = 0.0) -> CohortResult:
    """Merge the manifest parts, draw the pictures, write ``cohort.json`` last (and publish remote roots)."""
    n_total, work, model, spec = len(plan.class_of), plan.work, plan.model, plan.spec
    missing = [k for k in range(len(plan.shard_names)) if not plan.shard_done(k)]
    if missing:
        raise ArtifactError(f"cohort {plan.uri}: shards {missing[:10]} are not committed yet; "
                            "generate them (re-run the same request) before finishing")
    table = pa.concat_tables([_read_part(plan, k) for k in range(len(plan.shard_names))])
    table = table.sort_by("sample_id")
    if table.column("sample_id").to_pylist() != list(range(n_total)):
        raise ArtifactError(f"cohort {plan.uri} parts do not add up to {n_total} samples; delete {work} and re-run")
    storage.write_bytes(str(work / "manifest.parquet"), parquet_bytes(table))
    write_pictures(model, spec, plan.guidance, plan.device, table.to_pandas(), work,
                   shards_at=plan.uri if storage.is_remote(plan.uri) else None)  # remote: shards published
    dataset_uri = (model.card.get("dataset") or {}).get("uri")  # the real data the model learned from
    card = make_record(
        "cohort", spec, inputs={"model_uri": model.uri, "checkpoint_sha256": model.checkpoint_sha256,
                                "dataset_uri": dataset_uri},
        cohort_id=plan.cohort_id, uri=plan.uri, model_uri=model.uri, dataset_uri=dataset_uri,
        autoencoder=model.card.get("latent"),  # latent models: AE uri, sha256, scale factor
        model_mode=model.mode, class_names=model.class_names, counts=plan.quotas, total=n_total,
        shards=plan.shard_names, sampler=spec.sampler, steps=spec.steps, guidance_scale=plan.guidance,
        seed=spec.seed, device=str(plan.device), **precision(plan.device), seconds=round(seconds, 2),
        samples_per_second=round(generated / seconds, 2) if generated and seconds > 0 else None,
        resumed_samples=n_total - generated, write_order=WRITE_ORDER, unconditional=spec.unconditional,
    )
    storage.write_json(str(work / "cohort.json"), card)
    if storage.is_remote(plan.uri):
        storage.publish_dir(work, plan.uri, last=("cohort.json",))
        shutil.rmtree(work, ignore_errors=True)
    return CohortResult(plan.uri, card, existed=False, counts=plan.quotas)


def generate(spec: CohortSpec, root: str | None = None, progress: Progress | None = None) -> CohortResult:
    """Generate (or resume, or find) the cohort described by ``spec``: every missing shard, then the card."""
    plan = plan_cohort(spec, root)
    if isinstance(plan, CohortResult):
        return plan
    # a concurrent run of the same cohort waits here, then finds it done
    with artifact_lock(plan.uri, tell_waiting(progress, plan.uri)):
        if storage.exists(storage.join(plan.uri, "cohort.json")):
            card = storage.read_json(storage.join(plan.uri, "cohort.json"))
            return CohortResult(plan.uri, card, existed=True, counts=card["counts"])
        return _generate_missing(plan, progress)


def _generate_missing(plan: CohortPlan, progress: Progress | None) -> CohortResult:
    t0, n_total, done, generated = time.time(), len(plan.class_of), 0, 0
    shards = len(plan.shard_names)
    kept = sum(plan.shard_done(k) for k in range(shards))
    if kept:
        tell(progress, f"resuming: {kept} of {shards} shards already committed; generating the other {shards - kept}")
    try:
        for k in range(len(plan.shard_names)):
            base = done
            if generate_shard(plan, k, lambda n: progress and progress(base + n, n_total)):
                generated += len(plan.shard_ids(k))
            done += len(plan.shard_ids(k))
    except KeyboardInterrupt:  # Ctrl-C: committed shards stay (each was written atomically)
        kept = sum(plan.shard_done(k) for k in range(shards))
        raise Interrupted(f"stopped with {kept} of {shards} shards committed ({plan.uri}); the shard in progress "
                          "is discarded: re-run the same command to resume from there") from None
    return finish_cohort(plan, generated, time.time() - t0)


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
        name = model.class_names[cid] if cid >= 0 else UNKNOWN_CLASS
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


def regenerate_device(card: dict, device: str | None) -> torch.device:
    """The device to regenerate on: ``device``, or by default the recorded device type. Warns when the
    recorded device type or autocast dtype cannot be matched (the bytes may then differ)."""
    recorded = card.get("device_type")
    dev = resolve_device(device or ("cuda" if recorded == "cuda" and cuda_count() else "cpu"))
    if recorded is None:
        warnings.warn(f"cohort {card.get('cohort_id')} predates the exact-grid samplers (no device_type in its card): "
                      "regenerated images will differ from the stored ones", stacklevel=2)
    elif precision(dev) != {"device_type": recorded, "autocast": card.get("autocast")}:
        warnings.warn(f"cohort {card.get('cohort_id')} was made on {recorded} ({card.get('autocast')}); "
                      f"regenerating on {dev.type} ({precision(dev)['autocast']}) can differ in the last bits "
                      "or more: use a machine of the recorded device type for byte-identical images", stacklevel=2)
    return dev


def regenerate(cohort_uri: str, sample_id: int, device: str | None = None, alone: bool = False) -> bytes:
    """PNG bytes of one sample of a cohort, regenerated from its own seed.

    By default the sample is recomputed inside the batch it was made in (rebuilt from the cohort
    card's quotas, shard size and batch size), on the recorded device type: the bytes are identical
    to the stored image. ``device`` overrides the device (a warning says when it cannot match).
    ``alone=True`` runs it as a batch of one: CPU math kernels pick their blocking by batch size,
    so the image then matches up to the last bits (at most ±1 grey level on rare pixels).
    """

    configure_threads(load_aware=False)  # as generation did (thread count moves kernels' last bits)
    cohort = open_cohort(cohort_uri)
    card = cohort.card
    manifest = cohort.manifest().set_index("sample_id")
    if sample_id not in manifest.index:
        raise ArtifactError(f"sample id {sample_id} is not in cohort {cohort_uri} "
                            f"({manifest.index.min()}..{manifest.index.max()})")
    row = manifest.loc[sample_id]
    dev = regenerate_device(card, device)
    model_uri = storage.relocated(row["model_uri"], cohort_uri, "model.json") or row["model_uri"]  # root moved?
    model = load_model(model_uri, str(dev))
    guidance = None if pd.isna(row["guidance_scale"]) else float(row["guidance_scale"])
    batch = [sample_id]
    if not alone:
        class_of = sample_classes(card["counts"], card["class_names"])
        size, bs = int(card["config"]["shard_size"]), int(card["config"]["batch_size"])
        order = (write_order(class_of, int(card["config"]["seed"])) if card.get("write_order") == WRITE_ORDER
                 else np.arange(len(class_of)))  # older cohorts: class-major
        k = int(np.flatnonzero(order == sample_id)[0]) // size
        shard_ids = order[k * size:(k + 1) * size].tolist()
        batch = next(b for b in _batches(shard_ids, class_of, model, bs) if sample_id in b)
        rows = cohort.manifest().set_index("sample_id").loc[batch]
    else:
        rows = pd.DataFrame([row], index=[sample_id])
    imgs = generate_images(model, rows["class_id"].astype(int).tolist(), rows["seed"].astype(int).tolist(),
                           row["sampler"], int(row["steps"]), guidance, dev)
    return encode_png(imgs[batch.index(sample_id)].numpy().transpose(1, 2, 0))
