"""Distribution-level fidelity on feature sets: FID, KID, precision/recall, density/coverage.

All functions take features as float tensors ``real`` R×D and ``fake`` S×D (any extractor).

References:
- FID: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", NeurIPS 2017.
- KID: Bińkowski et al., "Demystifying MMD GANs", ICLR 2018.
- Precision/recall with k-NN manifolds: Kynkäänniemi et al., "Improved Precision and Recall
  Metric for Assessing Generative Models", NeurIPS 2019.
- Density/coverage: Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative
  Models", ICML 2020.
"""

from __future__ import annotations

import torch
from torch import nn


class PrecomputedFeatures(nn.Module):
    """The feature module handed to torchmetrics: features were already extracted by our extractor
    (once, and reused by every metric), so ``forward`` is the identity on N×D features."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``real`` R×D and ``fake`` S×D (Heusel 2017).

    d² = ‖μ_r − μ_f‖² + Tr Σ_r + Tr Σ_f − 2 Tr (Σ_r Σ_f)^½, with unbiased covariances — the quantity
    torchmetrics' ``FrechetInceptionDistance`` computes (tests check they agree). The trace of the
    matrix square root is computed exactly but cheaply: with centred features A, B,
    Tr (Σ_r Σ_f)^½ = ‖A Bᵀ‖_* / √((R−1)(S−1)) (nuclear norm; an R×S SVD) when min(R, S) < D, else
    Σ √eig(Σ_r^½ Σ_f Σ_r^½) (symmetric D×D eigendecompositions). torchmetrics' general D×D
    ``eigvals`` takes ~16 s per call for D = 2048 on 2 CPU cores, too slow per class and per bootstrap.
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("FID needs at least 2 samples per set")
    a, b = real.double(), fake.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    a, b = a - mu_a, b - mu_b
    na, nb, d = len(a), len(b), a.shape[1]
    tr_a = a.square().sum() / (na - 1)
    tr_b = b.square().sum() / (nb - 1)
    if min(na, nb) < d:
        tr_sqrt = torch.linalg.svdvals(a @ b.T).sum() / ((na - 1) * (nb - 1)) ** 0.5
    else:
        sa = a.T @ a / (na - 1)
        sb = b.T @ b / (nb - 1)
        w, v = torch.linalg.eigh(sa)
        sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
        tr_sqrt = torch.linalg.eigvalsh(sqrt_a @ sb @ sqrt_a).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + tr_a + tr_b - 2 * tr_sqrt
    return float(value.clamp(min=0))


def fid_torchmetrics(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID through ``torchmetrics.image.fid.FrechetInceptionDistance`` (reference implementation)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    m = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    m.update(real.float(), real=True)
    m.update(fake.float(), real=False)
    return float(m.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float, int]:
    """KID (Bińkowski 2018): cubic-polynomial-kernel MMD², mean and std over random subsets.

    Through torchmetrics' ``KernelInceptionDistance`` with our features passed via the feature
    module. ``subset_size`` is capped at min(R, S); returns (mean, std, subset size used).
    """
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least 2 samples per set")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features in buffer"
        m = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    m.update(real.float(), real=True)
    m.update(fake.float(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = m.compute()
    return float(mean), float(std), size


def _poly_kernel_sum(x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> tuple[float, float]:
    """Σ k(x_i, y_j) and Σ_i k(x_i, y_i) (the diagonal, when shapes match) for the KID kernel
    k(x, y) = (xᵀy / d + 1)³, in float64, chunked over x (never an N×M matrix beyond chunk×M)."""
    d = x.shape[1]
    total = 0.0
    for i in range(0, len(x), chunk):
        total += float(((x[i:i + chunk].double() @ y.double().T) / d + 1).pow(3).sum())
    diag = float(((x.double() * y.double()).sum(1) / d + 1).pow(3).sum()) if x.shape == y.shape else 0.0
    return total, diag


def kid_unbiased(real: torch.Tensor, fake: torch.Tensor) -> float:
    """KID on the whole sets: the unbiased MMD² estimator (Bińkowski 2018, eq. 2) with the cubic kernel
    k(x, y) = (xᵀy/d + 1)³ for real R×D, fake S×D. Unbiased, so its expectation does not depend on n."""
    r, s = len(real), len(fake)
    if r < 2 or s < 2:
        raise ValueError("KID needs at least 2 samples per set")
    krr, drr = _poly_kernel_sum(real, real)
    kss, dss = _poly_kernel_sum(fake, fake)
    krs, _ = _poly_kernel_sum(real, fake)
    return (krr - drr) / (r * (r - 1)) + (kss - dss) / (s * (s - 1)) - 2 * krs / (r * s)


def set_stats(real: torch.Tensor, fake: torch.Tensor, k: int = 5, radii: torch.Tensor | None = None
              ) -> dict[str, float]:
    """Every distribution metric of ``fake`` S×D against ``real`` R×D at once: fid, kid (unbiased, whole
    sets), precision, recall, density, coverage. ``radii``: ``knn_radii(real, k)`` when already known."""
    radii = knn_radii(real, k) if radii is None else radii
    in_real, in_fake = precision_recall_indicators(real, fake, k, radii)
    dens, cov = density_coverage_indicators(real, fake, k, radii)
    return {"fid": fid(real, fake), "kid": kid_unbiased(real, fake),
            "precision": float(in_real.float().mean()), "recall": float(in_fake.float().mean()),
            "density": float(dens.mean()), "coverage": float(cov.float().mean())}


def pairwise_distances(x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distances X×Y for x N×D, y M×D (float32, chunked over x)."""
    x, y = x.float(), y.float()
    return torch.cat([torch.cdist(x[i:i + chunk], y) for i in range(0, len(x), chunk)]) if len(x) \
        else torch.zeros(0, len(y))


def knn_radii(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance of each row of x N×D to its k-th nearest other row (N,)."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {len(x)}")
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk].float(), x.float())
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself at distance 0
    return torch.cat(out)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                     chunk: int = 2048) -> torch.Tensor:
    """Per point (P,): how many balls B(centre_i, radius_i) contain it."""
    out = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk].float(), centres.float())
        out.append((d <= radii[None, :]).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def precision_recall_indicators(real: torch.Tensor, fake: torch.Tensor, k: int = 5,
                                real_radii: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kynkäänniemi 2019. Returns (per-fake bool S: inside the real k-NN manifold,
    per-real bool R: inside the fake k-NN manifold); their means are precision and recall.
    ``real_radii`` (R,): precomputed ``knn_radii(real, k)``, shared across calls."""
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    in_real = _inside_any_ball(fake, real, real_radii) > 0
    in_fake = _inside_any_ball(real, fake, knn_radii(fake, k)) > 0
    return in_real, in_fake


def density_coverage_indicators(real: torch.Tensor, fake: torch.Tensor, k: int = 5,
                                real_radii: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Naeem 2020. Returns (per-fake float S: number of real k-NN balls containing it / k,
    per-real bool R: its ball contains at least one fake); their means are density and coverage."""
    radii = knn_radii(real, k) if real_radii is None else real_radii
    counts = _inside_any_ball(fake, real, radii).float() / k
    covered = []
    for i in range(0, len(real), 2048):
        d = torch.cdist(real[i:i + 2048].float(), fake.float())
        covered.append(d.min(1).values <= radii[i:i + 2048])
    return counts, torch.cat(covered)
