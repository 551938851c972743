"""Quality against cost per sampler: KID / domain-feature FID / label fidelity and images/s per NFE.

Trains (or reuses: fixed run names, resumable) a DDPM ε model and a rectified-flow model of the same
network on BloodMNIST, then for every sampler of each objective and NFE ∈ --nfe generates n class-
balanced images and compares them with n class-balanced real test images in the domain classifier's
feature space (``meddiff.evaluate``): KID (mean ± std over subsets), FID, and the fraction of images
the domain classifier labels as the class asked for. A "real" row (n other real test images) is the
floor at that n. NFE is counted by a wrapper around the network (rows per image: Heun 2N − 1, CFG 2×).
It prints the table, then "NFE needed to come within 10 % of the 1000-step DDPM's KID" (and FID) per
sampler: a DDPM model's samplers against its own 1000-step chain, rectified flow against the first DDPM's.
Models (``--objectives``): ``ddpm`` (ε), ``ddpm-v`` (v-prediction, same linear schedule), ``rflow``.

    python bench/bench_samplers.py --train-steps 3000 --n 500                 # a few CPU hours alone
    python bench/bench_samplers.py --train-steps 300 --n 128 --nfe 5 10 20 50  # what fits a busy CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from meddiff.data.ingest import IngestConfig, ingest
from meddiff.data.shards import open_dataset
from meddiff.evaluate.features import DomainTrainConfig, load_or_train_domain
from meddiff.evaluate.fidelity import fid, kid
from meddiff.generate.cohort import sample_seed
from meddiff.generate.sampling import generate_images
from meddiff.models.samplers import DDPM_SAMPLERS, RFLOW_SAMPLERS
from meddiff.models.trained import TrainedModel, load_model
from meddiff.train import TrainConfig, train


class CountingNet(torch.nn.Module):
    """Wraps a network and counts the rows it is called on (NFE × images, CFG rows included)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x, **kw):
        self.rows += x.shape[0]
        return self.net(x, **kw)


def balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude=()) -> np.ndarray:
    """Indices of ``per_class`` items of every class (none from ``exclude``)."""
    out = []
    for c in np.unique(labels):
        idx = np.setdiff1d(np.flatnonzero(labels == c), np.asarray(exclude, dtype=int))
        out.append(rng.choice(idx, per_class, replace=False))
    return np.concatenate(out)


# bench model name → (objective, prediction): the same tiny network, linear schedule, one output each
MODELS = {"ddpm": ("ddpm", "epsilon"), "ddpm-v": ("ddpm", "v"), "rflow": ("rflow", "epsilon")}


def train_model(dataset_uri: str, name: str, steps: int, root: str) -> str:
    objective, prediction = MODELS[name]
    cfg = TrainConfig(dataset_uri, mode="conditional", preset="tiny", steps=steps, device="cpu", objective=objective,
                      prediction=prediction, run_name=f"bench-samplers-{name}-{steps}", preview_steps=10)
    return train(cfg, root).uri


def sample(model: TrainedModel, classes: list[int], sampler: str, steps: int, guidance: float,
           batch_size: int) -> tuple[np.ndarray, float, float]:
    """uint8 (n, C, H, W) images, NFE per image and seconds."""
    counter = CountingNet(model.networks[None])
    counted = dataclasses.replace(model, networks={None: counter})
    out, t0 = [], time.perf_counter()
    for i in range(0, len(classes), batch_size):
        seeds = [sample_seed(0, j) for j in range(i, min(len(classes), i + batch_size))]
        out.append(generate_images(counted, classes[i:i + batch_size], seeds, sampler, steps, guidance,
                                   torch.device("cpu")).numpy())
    return np.concatenate(out), counter.rows / len(classes), time.perf_counter() - t0


def score(ext, real_feats: torch.Tensor, images: np.ndarray, classes: list[int]) -> dict:
    feats, probs = ext.features_and_probs(images)
    # subsets of half the set, so the ± spread over subsets means something (all-of-n subsets give 0)
    k_mean, k_std, _ = kid(real_feats, feats, subsets=50, subset_size=min(len(images) // 2, 1000))
    return {"kid": k_mean, "kid_std": k_std, "fid": fid(real_feats, feats),
            "label_acc": float((probs.argmax(1).numpy() == np.asarray(classes)).mean())}


def steps_for(sampler: str, nfe: int) -> int:
    return max(1, (nfe + 1) // 2) if sampler == "heun" else nfe


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--storage", default="storage/bench-samplers")
    p.add_argument("--medmnist-root", default="/work/shared/datasets/medmnist")
    p.add_argument("--train-steps", type=int, default=3000, help="training steps of each tiny model")
    p.add_argument("--n", type=int, default=256, help="images per set (class-balanced; real and synthetic)")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    p.add_argument("--ref-steps", type=int, default=1000, help="steps of the DDPM (η = 1) reference")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (2.0 doubles the NFE per step)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--objectives", nargs="+", default=["ddpm", "rflow"], choices=list(MODELS),
                   help="models to train and sample: ddpm (ε), ddpm-v (v-prediction), rflow")
    args = p.parse_args()
    ds_uri = ingest(IngestConfig("medmnist:bloodmnist", medmnist_root=args.medmnist_root), args.storage).uri
    dataset = open_dataset(ds_uri)
    ext = load_or_train_domain(dataset, DomainTrainConfig())
    x_test, y_test = dataset.load_split("test")
    k = dataset.num_classes
    rng = np.random.default_rng(0)
    ref_idx = balanced(y_test, args.n // k, rng)
    real_feats = ext(x_test[ref_idx])
    classes = [c for c in range(k) for _ in range(args.n // k)]
    other = balanced(y_test, args.n // k, rng, exclude=ref_idx)
    rows = [{"objective": "-", "sampler": "real", "steps": 0, "nfe": 0.0, "images_per_s": float("nan"),
             **score(ext, real_feats, x_test[other], y_test[other].tolist())}]
    print(f"# BloodMNIST 28 px, tiny network, {args.train_steps} training steps, n = {len(classes)} per set, "
          f"guidance {args.guidance}, {torch.get_num_threads()} CPU threads", flush=True)
    print(f"{'objective':9} {'sampler':8} {'steps':>5} {'NFE':>6} {'KID×1e3':>14} {'FID':>8} {'label acc':>9} "
          f"{'img/s':>7}", flush=True)
    show(rows[0])
    for objective in args.objectives:
        model = load_model(train_model(ds_uri, objective, args.train_steps, args.storage), "cpu")
        ddpm = MODELS[objective][0] == "ddpm"
        plan = [(s, steps_for(s, n)) for s in (DDPM_SAMPLERS if ddpm else RFLOW_SAMPLERS) for n in args.nfe]
        if ddpm:
            plan.append(("ddpm", args.ref_steps))
        for sampler, steps in plan:
            images, nfe, seconds = sample(model, classes, sampler, steps, args.guidance, args.batch_size)
            row = {"objective": objective, "sampler": sampler, "steps": steps, "nfe": nfe,
                   "images_per_s": len(classes) / seconds, **score(ext, real_feats, images, classes)}
            rows.append(row)
            show(row)
    summary(rows, args.ref_steps)


def show(r: dict) -> None:
    kid_txt = f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_std']:.2f}"
    print(f"{r['objective']:9} {r['sampler']:8} {r['steps']:>5} {r['nfe']:>6.0f} {kid_txt:>14} {r['fid']:>8.2f} "
          f"{r['label_acc']:>9.3f} {r['images_per_s']:>7.1f}", flush=True)


def summary(rows: list[dict], ref_steps: int) -> None:
    """The NFE each sampler needs to come within 10 % of a reference DDPM's KID and FID (the speed-up).

    Each DDPM model's samplers are measured against that model's own ``ref_steps`` ancestral chain;
    rectified-flow models against the first DDPM model's (same network and training budget)."""
    refs = {r["objective"]: r for r in rows if r["sampler"] == "ddpm" and r["steps"] == ref_steps}
    if not refs:
        return
    print("\nNFE needed to come within 10 % of the reference DDPM's KID / FID:")
    for objective, sampler in sorted({(r["objective"], r["sampler"]) for r in rows if r["objective"] != "-"}):
        ref = refs.get(objective, next(iter(refs.values())))
        mine = [r for r in rows if (r["objective"], r["sampler"]) == (objective, sampler) and r is not ref]
        words = []
        for metric in ("kid", "fid"):
            ok = [r["nfe"] for r in mine if r[metric] <= 1.1 * ref[metric]]
            words.append(f"{metric.upper()} {min(ok):.0f} NFE ({ref['nfe'] / min(ok):.0f}× fewer)" if ok
                         else f"{metric.upper()} not reached at the NFE tried")
        print(f"  {objective:6} {sampler:8} within 10 % of {ref['objective']}'s {ref_steps}-step DDPM "
              f"(KID {1e3 * ref['kid']:.2f}e-3, FID {ref['fid']:.2f}): " + "; ".join(words))


if __name__ == "__main__":
    main()
