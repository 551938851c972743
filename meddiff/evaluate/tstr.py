"""Utility: train on synthetic, test on real (TSTR; Esteban et al., "Real-valued (Medical) Time
Series Generation with Recurrent Conditional GANs", 2017).

A ResNet-18 (torchvision, random init) is trained with the MedMNIST v2 protocol (Yang et al.,
Scientific Data 2023: Adam, lr 1e-3, batch 128, lr × 0.1 at 50 % and 75 % of the epochs; at 28 px
the stem is a 3×3 stride-1 conv without max-pool) on real, synthetic, or real + synthetic
training images, and tested on the real test split: accuracy and macro one-vs-rest AUC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int,
                     batch_size: int = 128, lr: float = 1e-3, seed: int = 0, device: str = "cpu",
                     progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """Train :func:`resnet18_for` on float N×C×H×W in [0, 1] with labels N (MedMNIST v2 protocol)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = resnet18_for(images.shape[1], num_classes, images.shape[-1]).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.5 * epochs), int(0.75 * epochs)], gamma=0.1)
    steps = -(-len(images) // batch_size)
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(images), generator=g)
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            if len(idx) < 2:  # BatchNorm needs 2 samples
                continue
            loss = F.cross_entropy(net((images[idx] - 0.5).div(0.5).to(device)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress:
                progress(epoch * steps + s + 1, epochs * steps)
        sched.step()
    return net.eval()


@torch.inference_mode()
def predict_proba(net: nn.Module, images: torch.Tensor, device: str = "cpu", batch: int = 512) -> torch.Tensor:
    """Class probabilities N×K for float images N×C×H×W in [0, 1]."""
    return torch.cat([net((images[i:i + batch] - 0.5).div(0.5).to(device)).softmax(-1).cpu()
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


@dataclass(frozen=True)
class TstrResult:
    setting: str  # real | synthetic | real+synthetic
    n_train: int
    n_test: int
    accuracy: float
    auc: float | None
    epochs: int


def run_setting(setting: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                test_y: torch.Tensor, num_classes: int, epochs: int, seed: int = 0, device: str = "cpu",
                progress: Callable[[int, int], None] | None = None) -> TstrResult:
    """Train on (train_x, train_y), test on the real test split; images float in [0, 1]."""
    net = train_classifier(train_x, train_y, num_classes, epochs, seed=seed, device=device, progress=progress)
    probs = predict_proba(net, test_x, device)
    return TstrResult(setting, len(train_x), len(test_x), accuracy(probs, test_y), macro_auc(probs, test_y), epochs)
