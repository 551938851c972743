"""Utility: train on synthetic, test on real (TSTR; Esteban et al., "Real-valued (Medical) Time
Series Generation with Recurrent Conditional GANs", 2017).

Fair by construction: real, real at the synthetic set's size and class mix, synthetic and real +
synthetic training sets get the SAME number of optimizer steps (an iteration-based schedule: Adam,
lr 1e-3, batch 128, lr × 0.1 at 50 % and 75 % of the steps, as MedMNIST v2 counts in epochs), the
checkpoint is chosen on the real validation split, and accuracy and macro one-vs-rest AUC are
measured on the real test split. Protocols:
"fair" trains the small CNN of the domain classifier (CPU-sized); "medmnist" trains ResNet-18
(torchvision, random init; at 28 px a 3×3 stride-1 stem without max-pool) for 100 epochs of the
real training set's size (Yang et al., Scientific Data 2023) — a GPU job. The synthetic set is judged
against the equal-size real set (like with like: the same n and class mix); the full real set is the
ceiling shown beside it, and the majority class's share of the test split is the floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meddiff.evaluate.loading import Images


def resnet18_for(channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision ResNet-18, random init; small images (< 64 px) get the CIFAR/MedMNIST-28 stem."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=num_classes)
    if image_size < 64:
        net.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return net


def _f(x: torch.Tensor) -> torch.Tensor:
    """A batch → float in [−1, 1] (uint8 converted per batch)."""
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    return (x - 0.5) / 0.5


def make_net(protocol: str, channels: int, num_classes: int, image_size: int) -> nn.Module:
    """"medmnist": ResNet-18 (MedMNIST v2); "fair": the small CPU-sized CNN of the domain classifier."""
    if protocol == "medmnist":
        return resnet18_for(channels, num_classes, image_size)
    from meddiff.evaluate.features import DomainNet

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = DomainNet(channels, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # DomainNet maps [0, 1] itself
            return self.net(x * 0.5 + 0.5)[1]
    return Small()


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int,
                     val: tuple[torch.Tensor, torch.Tensor] | None = None, protocol: str = "fair",
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0, device: str = "cpu",
                     evals: int = 10, progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """Train for exactly ``steps`` optimizer steps (Adam, lr × 0.1 at 50 % and 75 % of the steps: the
    MedMNIST v2 schedule counted in iterations, so every training set gets the same budget) on
    N×C×H×W images (uint8 or [0, 1] floats); the checkpoint with the best accuracy on ``val`` (the
    real validation split) among ``evals`` evenly spaced ones is returned."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = make_net(protocol, images.shape[1], num_classes, images.shape[-1]).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.5 * steps), int(0.75 * steps)], gamma=0.1)
    every = max(1, steps // max(evals, 1))
    best, best_state = -1.0, None
    perm, pos = torch.randperm(len(images), generator=g), 0
    for step in range(1, steps + 1):
        if pos + min(batch_size, len(images)) > len(images):
            perm, pos = torch.randperm(len(images), generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        net.train()
        loss = F.cross_entropy(net(_f(images[idx]).to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if val is not None and (step % every == 0 or step == steps):
            acc = accuracy(predict_proba(net, val[0], device), val[1])
            if acc > best:
                best, best_state = acc, {k: v.detach().clone() for k, v in net.state_dict().items()}
        if progress:
            progress(step, steps)
    if best_state is not None:
        net.load_state_dict(best_state)
    return net.eval()


@torch.inference_mode()
def predict_proba(net: nn.Module, images: torch.Tensor, device: str = "cpu", batch: int = 512) -> torch.Tensor:
    """Class probabilities N×K for float images N×C×H×W in [0, 1]."""
    net.eval()
    return torch.cat([net(_f(images[i:i + batch]).to(device)).softmax(-1).cpu()
                      for i in range(0, len(images), batch)])


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).float().mean())


def macro_auc(probs: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Macro one-vs-rest ROC AUC (binary: AUC of the positive class); None if a class is absent."""
    from sklearn.metrics import roc_auc_score

    y, p = labels.numpy(), probs.double().numpy()
    k = p.shape[1]
    if len(np.unique(y)) < k:
        return None
    if k == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr", average="macro"))


def equal_size_real(train: Images, labels: np.ndarray, seed: int) -> Images:
    """Real training images with the class counts of ``labels`` (a synthetic set's), drawn without
    replacement (seeded); a class with fewer real images than asked gives all it has."""
    rng = np.random.default_rng([seed, 0x7577])
    idx = [rng.choice(np.flatnonzero(train.y == c), min(int((labels == c).sum()), int((train.y == c).sum())),
                      replace=False) for c in np.unique(labels)]
    return train.take(np.sort(np.concatenate(idx)) if idx else np.zeros(0, np.int64))


def majority_accuracy(test_y: np.ndarray) -> float:
    """Accuracy of always predicting the test split's commonest class: a classifier at or below it learned nothing."""
    return float(np.bincount(test_y).max() / len(test_y)) if len(test_y) else float("nan")


@dataclass(frozen=True)
class TstrResult:
    setting: str  # real | real (equal size) | synthetic | real+synthetic
    n_train: int
    n_test: int
    accuracy: float
    auc: float | None
    steps: int
    ci: list[float] | None = None  # Wilson 95 % interval of the test accuracy


def run_setting(setting: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                test_y: torch.Tensor, num_classes: int, steps: int, val: tuple[torch.Tensor, torch.Tensor] | None,
                protocol: str = "fair", seed: int = 0, device: str = "cpu",
                progress: Callable[[int, int], None] | None = None) -> tuple[TstrResult, torch.Tensor]:
    """Train on (train_x, train_y) for ``steps`` steps, select on ``val``, test on the real test split;
    returns the result and the test-set probabilities N×K."""
    from meddiff.evaluate.bootstrap import mean_ci

    net = train_classifier(train_x, train_y, num_classes, steps, val, protocol, seed=seed, device=device,
                           progress=progress)
    probs = predict_proba(net, test_x, device)
    correct = (probs.argmax(1) == test_y).double().numpy()
    ci = mean_ci(correct, 1)
    return TstrResult(setting, len(train_x), len(test_x), accuracy(probs, test_y), macro_auc(probs, test_y), steps,
                      list(ci) if ci else None), probs
