"""An offline perceptual loss: LPIPS's distance with unit layer weights on a local torchvision
AlexNet or VGG16 backbone (``--perceptual-weights PATH``; nothing is downloaded at run time).

d(x, x̂) = Σ_l 1/(H_l W_l) Σ_hw ‖ŷ_l − ŷ̂_l‖²  with ŷ_l the channel-normalised features of layer l
(Zhang et al. 2018, Eq. 1, w_l = 1: the "lin"-less variant, since the PyPI wheels hold only the heads).
"""

from __future__ import annotations

import torch

from meddiff.errors import MeddiffError

TAPS = {"alexnet": (1, 4, 7, 9, 11), "vgg16": (3, 8, 15, 22, 29)}  # ReLU outputs LPIPS reads
SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)  # LPIPS ScalingLayer: inputs in [-1, 1]
SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
MIN_SIZE = 64  # smaller images are up-sampled to this side first (LPIPS's own 64 px patches)


class PerceptualLoss(torch.nn.Module):
    """Frozen backbone features; call ``loss(x, x_hat)`` with (B, C, H, W) in [-1, 1], C = 1 or 3 → scalar."""

    def __init__(self, path: str):
        super().__init__()
        import torchvision

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise MeddiffError(f"--perceptual-weights {path} is not a readable torch state dict ({e})") from e
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        first = state.get("features.0.weight") if isinstance(state, dict) else None
        if first is None:
            raise MeddiffError(f"--perceptual-weights {path}: expected a torchvision AlexNet or VGG16 state dict")
        self.arch = "alexnet" if first.shape[-1] == 11 else "vgg16"
        net = getattr(torchvision.models, self.arch)(weights=None)
        try:  # the backbone only: a full torchvision state dict or just its ``features.*`` entries
            net.features.load_state_dict({k[len("features."):]: v for k, v in state.items()
                                          if k.startswith("features.")})
        except RuntimeError as e:
            raise MeddiffError(f"--perceptual-weights {path} does not fit torchvision's {self.arch}: {e}") from e
        self.features = net.features[: TAPS[self.arch][-1] + 1].eval().requires_grad_(False)
        self.register_buffer("shift", SHIFT)
        self.register_buffer("scale", SCALE)

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        if min(x.shape[-2:]) < MIN_SIZE:  # AlexNet's pooling needs ≥ 63 px: up-sample small images (MedMNIST 28 px)
            x = torch.nn.functional.interpolate(x, size=(MIN_SIZE, MIN_SIZE), mode="bilinear", align_corners=False)
        x = (x.expand(-1, 3, -1, -1) - self.shift) / self.scale  # grey → RGB, LPIPS input scaling
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS[self.arch]:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # unit norm over channels
        return out

    def distances(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,) of (B, C, H, W) pairs in [-1, 1]."""
        return sum((a - b).pow(2).sum(1).mean((1, 2)) for a, b in zip(self._feats(x), self._feats(x_hat)))

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return self.distances(x, x_hat).mean()
