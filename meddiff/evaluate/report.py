"""Evaluate a synthetic cohort against its real dataset: the I/O around ``evaluate_images``.

``evaluate_cohort(cohort_uri, cfg)`` loads the cohort and the real splits (uint8), gets the cached
domain classifier, calls :func:`meddiff.evaluate.scoring.evaluate_images`, fills the manifest's
quality columns, and writes ``report.html`` then ``report.json`` (last: the report is complete
when it exists) into the cohort folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from meddiff import storage
from meddiff.data.cohorts import Cohort, open_cohort, write_quality
from meddiff.data.shards import DatasetVersion, open_dataset, split_summary
from meddiff.devices import resolve_device
from meddiff.errors import Interrupted, MeddiffError
from meddiff.evaluate.config import EvalConfig
from meddiff.evaluate.features import domain_cache_uri, load_inception, load_or_train_domain, real_features
from meddiff.locks import artifact_lock, tell_waiting
from meddiff.threads import configure_threads
from meddiff.evaluate.html import render_html
from meddiff.evaluate.loading import Images, RealSplits, check_compatible, load_cohort_images, load_real
from meddiff.evaluate.schema import REPORT_SCHEMA_VERSION
from meddiff.evaluate.scoring import Evaluation, evaluate_images
from meddiff.progress import Progress, tell, told_only
from meddiff.records import content_hash, make_record, sha256_bytes, to_jsonable

__all__ = ["EvalConfig", "EvalResult", "evaluate_cohort", "run_tstr"]

REPORT_JSON, REPORT_HTML = "report.json", "report.html"


@dataclass(frozen=True)
class EvalResult:
    report_uri: str  # <cohort>/report.json
    report: dict[str, Any]  # its content
    existed: bool = False  # True: an up-to-date report was found and nothing was recomputed

    @property
    def html_uri(self) -> str:
        return self.report_uri.rsplit("/", 1)[0] + "/" + REPORT_HTML


def real_dataset_uri(cohort: Cohort, cfg: EvalConfig) -> str:
    """The real dataset to compare with: the config's, else the cohort card's, else the model card's (a
    recorded URI followed to this cohort's storage root when that root was moved: storage.relocated)."""
    if cfg.real_uri:
        return cfg.real_uri
    if cohort.card.get("dataset_uri"):
        uri = storage.relocated(cohort.card["dataset_uri"], cohort.uri, "dataset.json")
        if uri is None:
            raise MeddiffError(f"{cohort.uri}: its real dataset {cohort.card['dataset_uri']} (named in cohort.json) "
                               "is not there, nor under this cohort's storage root: pass the dataset version with "
                               "--real (`meddiff datasets list` shows them)")
        return uri
    recorded = cohort.card.get("model_uri")
    if recorded and (model_uri := storage.relocated(recorded, cohort.uri, "model.json")):
        from meddiff.models.trained import trained_on

        if uri := trained_on(storage.read_json(storage.join(model_uri, "model.json")), cohort.uri):
            return uri
    raise MeddiffError(f"{cohort.uri}: cohort.json names no real dataset (nor does its model card); "
                       "pass the dataset version with --real")


def model_of(cohort: Cohort) -> str | None:
    """The cohort's model (its card's URI, followed to this cohort's storage root if that was moved)."""
    uri = cohort.card.get("model_uri")
    return uri and (storage.relocated(uri, cohort.uri, "model.json") or uri)


PLACES = ("real_uri", "cache_root")  # where things are, not what is computed: outside the report's key


def _config_hash(cfg: EvalConfig, dataset: DatasetVersion) -> str:
    """What a report depends on: the settings and the real dataset by name and version, not by path,
    so a storage root moved, copied or mounted elsewhere keeps its reports up to date."""
    return content_hash({"config": replace(cfg, **dict.fromkeys(PLACES)),
                         "dataset": f"{dataset.card.get('name')}/{dataset.version}", "schema": REPORT_SCHEMA_VERSION})


def _legacy_config_hash(cfg: EvalConfig, dataset_uri: str) -> str:
    """The key reports had before it left paths out: such a report, where it has not moved, is still current."""
    return content_hash({"config": cfg, "dataset_uri": dataset_uri, "schema": REPORT_SCHEMA_VERSION})


def _existing(report_uri: str, cohort_uri: str, chash: str, cfg: EvalConfig, dataset: DatasetVersion
              ) -> tuple[dict[str, Any] | None, str | None]:
    """The up-to-date report to reuse, or None and why the report there (if any) is replaced."""
    if not storage.exists(report_uri):
        return None, None
    try:
        old = storage.read_json(report_uri)
    except (ValueError, OSError):
        return None, "it cannot be read"
    if old.get("config_hash") in (chash, _legacy_config_hash(cfg, dataset.uri)):
        html = storage.exists(storage.join(cohort_uri, REPORT_HTML))
        return (old, None) if html else (None, f"its {REPORT_HTML} is gone")
    if (schema := old.get("report_schema_version")) != REPORT_SCHEMA_VERSION:
        return None, f"it has report schema {schema}, this meddiff writes {REPORT_SCHEMA_VERSION}"
    before, now = old.get("config") or {}, to_jsonable(cfg)
    changed = [f"{k} {json.dumps(before.get(k))} → {json.dumps(v)}" for k, v in now.items()
               if before.get(k) != v and k not in PLACES]
    inputs = old.get("inputs") or {}
    if inputs.get("dataset_version") != dataset.version:
        changed.append(f"real dataset {inputs.get('dataset_uri')} → {dataset.uri}")
    return None, f"it was made with other settings ({', '.join(changed) or 'not recorded'})"


def run_tstr(dataset: DatasetVersion, cfg: EvalConfig, device: str, progress: Progress | None = None):
    """The TSTR callback for ``evaluate_images``: real, real at the synthetic set's size and class mix
    (the baseline the synthetic set is judged against), synthetic, real+synthetic; equal steps."""
    from meddiff.evaluate.loading import load_images
    from meddiff.evaluate.tstr import equal_size_real, majority_accuracy, run_setting

    def tstr(syn: Images, real: RealSplits, flags: torch.Tensor, warnings: list[str]) -> dict[str, Any] | None:
        test = real.heldout if real.heldout is not None else load_images(dataset.shard_uris("test"))
        keep = ~flags.numpy() if cfg.drop_flagged else np.ones(len(syn), bool)
        xs, ys = syn.x[keep], syn.y[keep]
        rng = np.random.default_rng(cfg.seed)

        def capped(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if not cfg.tstr_max_images or len(x) <= cfg.tstr_max_images:
                return x, y
            idx = np.sort(rng.choice(len(x), cfg.tstr_max_images, replace=False))
            return x[idx], y[idx]

        whole = capped(real.train.x, real.train.y)  # capped in this order: the seeded subsamples stay put
        synthetic = capped(xs, ys)
        both = capped(np.concatenate([real.train.x, xs]), np.concatenate([real.train.y, ys]))
        same = equal_size_real(real.train, synthetic[1], cfg.seed)  # the baseline: synthetic's n and class mix
        if len(same) < len(synthetic[1]):
            warnings.append(f"TSTR: the real training split has fewer images of some class than the synthetic "
                            f"set; the equal-size real baseline uses all it has ({len(same)} vs {len(synthetic[1])})")
        sets = {"real": whole, "real (equal size)": (same.x, same.y), "synthetic": synthetic, "real+synthetic": both}
        steps = cfg.tstr_steps if cfg.tstr_protocol == "fair" else 100 * -(-len(real.train) // 128)
        val = (torch.from_numpy(real.val.x), torch.as_tensor(real.val.y))
        # the medmnist protocol is a GPU job: say what it trains before minutes (or hours) without a word
        cpu = (" — hours on a CPU for a large dataset (--tstr-protocol fair is CPU-sized)"
               if cfg.tstr_protocol == "medmnist" and device == "cpu" else "")
        tell(progress, f"TSTR: {len(sets)} classifiers × {steps} optimizer steps ({cfg.tstr_protocol} protocol) on "
                       f"{device}{cpu}")
        rows = []
        for i, (name, (x, y)) in enumerate(sets.items(), 1):
            if len(y) < 2:
                warnings.append(f"TSTR setting {name} skipped: {len(y)} training images")
                continue
            tell(progress, f"TSTR {i} of {len(sets)}: training on {name}, {len(y)} images")
            r, _ = run_setting(name, torch.from_numpy(x), torch.as_tensor(y), torch.from_numpy(test.x),
                               torch.as_tensor(test.y), dataset.num_classes, steps, val, cfg.tstr_protocol,
                               cfg.seed, device)
            rows.append(r.__dict__)
        model = "resnet18 (MedMNIST v2 recipe)" if cfg.tstr_protocol == "medmnist" else "small CNN (domain-net)"
        return {"model": model, "protocol": cfg.tstr_protocol, "steps": steps, "selection": "best real val accuracy",
                "test_split": f"real {cfg.heldout_split}", "synthetic_excludes_flagged": cfg.drop_flagged,
                "max_train_images": cfg.tstr_max_images, "baseline": "real (equal size)",
                "majority_accuracy": majority_accuracy(np.asarray(test.y)), "settings": rows}
    return tstr


def evaluate_cohort(cohort_uri: str, cfg: EvalConfig | None = None, progress: Progress | None = None,
                    force: bool = False) -> EvalResult:
    """Evaluate a cohort; writes ``report.html``, the manifest quality columns, then ``report.json``.

    An up-to-date report (same config and dataset) is reused unless ``force``. One evaluation of a
    cohort at a time: a concurrent one waits (meddiff.locks), then reuses the report just written.
    """
    cfg = (cfg or EvalConfig()).check()  # bad settings are refused first, before any lock is waited on
    cohort = open_cohort(cohort_uri)  # a missing or foreign folder is refused before the lock writes in it
    try:
        with artifact_lock(storage.join(cohort.uri, "report"), tell_waiting(progress, f"the report of {cohort.uri}")):
            return _evaluate_locked(cohort, cfg, progress, force)
    except KeyboardInterrupt:  # Ctrl-C: report.json is written last, so an existing one is left as it was
        raise Interrupted(f"stopped before {storage.join(cohort.uri, REPORT_JSON)} was written (an existing one is "
                          "left as it was): re-run the same command to evaluate; a domain classifier already "
                          "trained is cached and reused") from None


def _evaluate_locked(cohort: Cohort, cfg: EvalConfig, progress: Progress | None, force: bool) -> EvalResult:
    device = str(resolve_device(cfg.device))
    report_uri = storage.join(cohort.uri, REPORT_JSON)
    dataset = open_dataset(real_dataset_uri(cohort, cfg))
    recorded = cohort.card.get("dataset_uri")
    if not cfg.real_uri and recorded is not None and storage.absolute(recorded) != dataset.uri:
        tell(progress, f"the cohort's dataset is no longer at {cohort.card['dataset_uri']}: using {dataset.uri}, "
                       "the same version under this cohort's storage root")
    chash = _config_hash(cfg, dataset)
    old, stale = (None, None) if force else _existing(report_uri, cohort.uri, chash, cfg, dataset)
    if old is not None:
        return EvalResult(report_uri, old, existed=True)
    manifest = cohort.manifest().sort_values("sample_id").reset_index(drop=True)
    syn = load_cohort_images(cohort, manifest)
    check_compatible(cohort, manifest, dataset, syn)  # a wrong --real is refused before "replacing" is said
    if stale:  # the report a user (or the pipeline) made before is overwritten: say so, and why
        tell(progress, f"replacing {report_uri}: {stale}")
    configure_threads()  # CPU threads that fit the machine now (meddiff.threads)
    stages, done = 6 + (1 if cfg.tstr else 0), [0]

    def step() -> None:
        done[0] += 1
        if progress:
            progress(done[0], stages)

    real = load_real(dataset, cfg.heldout_split)
    domain = load_or_train_domain(dataset, cfg.domain, device, cfg.cache_root, told_only(progress))  # says if it trains
    inception = load_inception(device) if "inception" in cfg.features else None
    real_inception = inception and real_features(inception, dataset.uri, cfg.cache_root)  # real sets: cached
    step()
    tstr = run_tstr(dataset, cfg, device, progress) if cfg.tstr else None
    ev = evaluate_images(syn, real, cfg, dataset.class_names, domain, inception, step, tstr,
                         oracle_labels=cohort.unconditional, real_inception=real_inception)
    if cohort.unconditional:  # the report's grids and tables show the oracle's classes
        syn = Images(syn.x, ev.oracle_class.astype(np.int64), syn.keys)
    ev.body["extractors"]["domain"]["cache_uri"] = domain_cache_uri(dataset.uri, cfg.domain, cfg.cache_root)
    if real_inception is not None:  # where the real sets' features are kept
        ev.body["extractors"]["inception"]["real_features_cache"] = real_inception.folder
    for p in ev.body["memorization"]["closest_pairs"]:
        p["sample_id"] = int(manifest["sample_id"][p["index"]])
    write_report(cohort, dataset, manifest, syn, real, ev, cfg, chash, device, report_uri)
    step()
    return EvalResult(report_uri, storage.read_json(report_uri))


def write_report(cohort: Cohort, dataset: DatasetVersion, manifest: pd.DataFrame, syn: Images, real: RealSplits,
                 ev: Evaluation, cfg: EvalConfig, chash: str, device: str, report_uri: str) -> None:
    """report.html, the manifest's quality columns, then report.json (written last)."""
    model_uri = model_of(cohort)
    inputs = {"cohort_uri": cohort.uri, "cohort_id": cohort.card.get("cohort_id"), "dataset_uri": dataset.uri,
              "dataset_version": dataset.version, "model_uri": model_uri,
              "checkpoint_sha256": (cohort.card.get("inputs") or {}).get("checkpoint_sha256")}  # what made it, by hash
    report = make_record(
        "evaluation-report", cfg, inputs,
        report_schema_version=REPORT_SCHEMA_VERSION, config_hash=chash, device=device,
        drop_flagged=cfg.drop_flagged, real_splits=split_summary(dataset.card), **ev.body)
    html = render_html(report, syn, real.train, ev.nearest_index, ev.order, dataset.class_names,
                       cfg.grid_per_class, model_uri, ev.umap_png)
    report["html"] = {"file": REPORT_HTML, "sha256": sha256_bytes(html)}
    quality = pd.DataFrame({
        "nearest_real_distance": ev.nearest_feature.double().numpy(),
        "nearest_real_pixel_distance": ev.nearest_pixel.double().numpy(),
        "nearest_real_key": [real.train.keys[int(i) % len(real.train)] for i in ev.nearest_index],
        "oracle_prob": ev.oracle_prob.double().numpy(),
        "flagged": ev.flags.numpy().astype(bool),
        "oracle_class_id": ev.oracle_class.astype(np.int64),
    }, index=pd.Index(manifest["sample_id"].to_numpy(), name="sample_id"))
    storage.write_bytes(storage.join(cohort.uri, REPORT_HTML), html)
    write_quality(cohort.uri, quality)
    storage.write_json(report_uri, report)  # last: the report is complete when report.json exists
