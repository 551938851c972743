"""Seconds to evaluate an N-image cohort (default 10,000) against BloodMNIST, per stage.

    python bench/bench_evaluate.py                                  # N=10000, domain features, CPU or CUDA
    python bench/bench_evaluate.py --features inception,domain --max-images 1000
    python bench/bench_evaluate.py --inception-throughput 128       # Inception images/s only
    python bench/bench_evaluate.py --n 100000                       # the 100k cohort of issue 10 (peak RSS too)
    DS=$(meddiff ingest zip:../shared/datasets/kaggle/leukemia-sample.zip --size 128 | tail -1)
    python bench/bench_evaluate.py --dataset-uri $DS --n 20000      # 128 px: memory stays bounded

The cohort is built from REAL BloodMNIST test images (random dihedral flips/rotations, so they are
new pixel arrays and not copies of training images), not from a trained model: evaluation cost
does not depend on where the images come from. Timed with ``evaluate_cohort``'s progress callback
(stage boundaries): load, domain features, Inception features, distribution metrics (FID/KID,
precision/recall, density/coverage, overall + per class + the val-vs-train baseline), pixel
metrics (nearest-train RMSE, SSIM, intra-class SSIM), label fidelity, memorization, report.
The domain classifier's one-off training (cached per dataset version) is timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

STAGES = ["load cohort + real splits (+ domain training if not cached)", "features (domain; Inception if asked)",
          "distribution metrics at matched n, two references + half-sampling intervals",
          "memorization (nearest train image, mirrors included)", "pixel metrics + label fidelity",
          "report (html, json, manifest)"]


def build_cohort(ds, n: int, folder: Path, seed: int = 0) -> str:
    import numpy as np

    from cohort_factory import make_cohort

    x, y = ds.load_split("test")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), n)
    k, flip = rng.integers(0, 4, n), rng.random(n) < 0.5
    imgs = np.stack([np.rot90(x[i][:, :, ::-1] if f else x[i], r, axes=(1, 2)) for i, r, f in zip(idx, k, flip)])
    return make_cohort(folder, ds.uri, ds.class_names, np.ascontiguousarray(imgs), y[idx])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="cohort size")
    ap.add_argument("--features", default="domain", help="inception,domain | domain | inception")
    ap.add_argument("--max-images", type=int, default=0, help="per-set cap for Inception features (0 = all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--storage", default=os.path.join(tempfile.gettempdir(), "meddiff-bench"))
    ap.add_argument("--dataset-uri", default=None, help="an ingested BloodMNIST version (default: ingest it)")
    ap.add_argument("--medmnist-root", default=os.environ.get("MEDMNIST_ROOT") or
                    os.path.join(os.environ.get("MEDDIFF_TEST_DATASETS", "/work/shared/datasets"), "medmnist"))
    ap.add_argument("--inception-throughput", type=int, default=0, help="only time Inception on this many images")
    args = ap.parse_args()

    import torch

    from meddiff.evaluate import EvalConfig, evaluate_cohort
    from meddiff.data.ingest import IngestConfig, ingest
    from meddiff.evaluate.features import DomainTrainConfig, load_inception, load_or_train_domain
    from meddiff.devices import resolve_device
    from meddiff.data.shards import open_dataset

    device = str(resolve_device(args.device))
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    uri = args.dataset_uri or ingest(IngestConfig("medmnist:bloodmnist", medmnist_root=args.medmnist_root), args.storage).uri
    ds = open_dataset(uri)

    if args.inception_throughput:
        x, _ = ds.load_split("test")
        inc = load_inception(device)
        inc(x[:8])  # warm-up
        t = time.perf_counter()
        inc(x[:args.inception_throughput])
        dt = time.perf_counter() - t
        print(json.dumps({"device": dev_name, "inception_images": args.inception_throughput, "seconds": round(dt, 2),
                          "images_per_s": round(args.inception_throughput / dt, 2)}))
        return

    t = time.perf_counter()
    load_or_train_domain(ds, DomainTrainConfig(), device)
    domain_train_s = time.perf_counter() - t

    folder = Path(args.storage) / "bench-cohorts" / f"bloodmnist-real-{args.n}"
    t = time.perf_counter()
    cohort = build_cohort(ds, args.n, folder) if not (folder / "cohort.json").exists() else str(folder)
    build_s = time.perf_counter() - t

    cfg = EvalConfig(features=tuple(args.features.split(",")), max_images=args.max_images or None, device=device)
    marks: list[float] = []
    t0 = time.perf_counter()
    import resource

    def max_rss_gib() -> float:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)  # Linux: KiB

    rss_before, rss_marks = max_rss_gib(), []
    result = evaluate_cohort(cohort, cfg, lambda done, total: (marks.append(time.perf_counter()),
                                                               rss_marks.append(max_rss_gib())), force=True)
    total = time.perf_counter() - t0
    stages = {name: round(b - a, 2) for name, a, b in zip(STAGES, [t0] + marks, marks)}
    rep = result.report
    peak_rss_gib = max_rss_gib()
    print(json.dumps({
        "device": dev_name, "peak_rss_gib (whole process, cohort build included)": round(peak_rss_gib, 2), "cohort_images": args.n, "real_train": rep["real"]["train"], "real_val": rep["real"]["val"],
        "features": list(cfg.features), "inception_images_per_set": rep["extractors"].get("inception", {}).get("images"),
        "domain_classifier_training_s (one-off, cached)": round(domain_train_s, 1),
        "cohort_build_s (not part of evaluation)": round(build_s, 1),
        "evaluate_s": round(total, 1), "stages_s": stages,
        "peak_rss_gib_before_evaluation": rss_before,  # ingest, domain classifier, cohort build
        "peak_rss_gib_after_each_stage": dict(zip(STAGES, rss_marks)),  # the process peak so far (monotonic)
        "verdict": rep["verdict"]["sentence"],
        "headline": {k: (v or {}).get("value") for k, v in rep["headline"].items()},
    }, indent=2, default=str))


if __name__ == "__main__":
    main()
