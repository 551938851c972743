"""Plot helpers of issue 15: the UMAP of real vs synthetic features, and the fixed-draw val loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_umap_png_draws_one_panel_per_class():
    pytest.importorskip("umap")
    from PIL import Image
    import io

    from meddiff.evaluate.umap_plot import embed, umap_png

    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(0, 1, (60, 16)), rng.normal(6, 1, (60, 16))]).astype(np.float32)
    syn = np.concatenate([rng.normal(0, 1, (30, 16)), rng.normal(6, 1, (30, 16))]).astype(np.float32)
    y_real, y_syn = np.repeat([0, 1], 60), np.repeat([0, 1], 30)
    xy = embed(np.concatenate([real, syn]))
    # the two classes are far apart in feature space: they stay apart on the map
    c0, c1 = xy[np.r_[y_real, y_syn] == 0].mean(0), xy[np.r_[y_real, y_syn] == 1].mean(0)
    spread = xy[np.r_[y_real, y_syn] == 0].std(0).max()
    assert np.linalg.norm(c0 - c1) > 3 * spread
    png = umap_png(real, y_real, syn, y_syn, ["a", "b"])
    assert Image.open(io.BytesIO(png)).size[0] > 300


def test_report_umap_step_records_why_it_drew_nothing():
    """The report's UMAP never fails an evaluation: switched off, or too few points, it says why."""
    from meddiff.evaluate.config import EvalConfig
    from meddiff.evaluate.scoring import umap_step

    f, y = torch.randn(2, 8), np.array([0, 1])
    png, rec = umap_step(f, y, f, y, ["a", "b"], EvalConfig(umap_points=0))
    assert png is None and rec == {"skipped": "umap_points = 0"}
    if pytest.importorskip("umap"):
        png, rec = umap_step(f, y, f[:1], y[:1], ["a", "b"], EvalConfig())  # 3 points: too few for a map
        assert png is None and "at least 4" in rec["skipped"] and rec["n_synthetic"] == 2 and rec["n_real"] == 1
    with pytest.raises(Exception, match="umap_points"):
        EvalConfig(umap_points=3).check()


def test_val_probe_is_fixed_and_tracks_the_network():
    from meddiff.models.diffusion import build_scheduler, scheduler_config
    from meddiff.models.networks import NetworkConfig, build_network
    from meddiff.train.val_loss import make_probe

    torch.manual_seed(0)
    images, labels = torch.rand(40, 1, 16, 16), torch.randint(0, 2, (40,))
    sched = build_scheduler(scheduler_config("ddpm", "linear", "epsilon", 1000, 16))
    net = build_network(NetworkConfig(), 1, None)
    probe = make_probe(images, labels, sched, class_id=1, n=16, seed=3)
    assert probe is not None and probe.y is None and len(probe.x0) == min(16, int((labels == 1).sum()))
    first, again = probe.loss(net, sched), probe.loss(net, sched)
    assert first == again  # the same draws every time: the curve moves only with the weights
    assert abs(first - 1.0) < 0.3  # MONAI zero-initialises the output conv: ε̂ = 0, loss = E‖ε‖² ≈ 1
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert probe.loss(net, sched) != first
    assert make_probe(images[:0], labels[:0], sched, None) is None


def test_report_loss_curve_marks_a_val_loss_logged_once(tmp_path, monkeypatch):
    """A short run logs its val loss at its one checkpoint: one point, which a plain line never draws
    (the report's legend named a curve that was not there)."""
    import json

    from meddiff.evaluate import html as report_html

    rows = [{"step": s, "loss": 1.0 / s} for s in range(10, 70, 10)]
    rows[-1]["val_loss"] = 0.2
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figs = []
    monkeypatch.setattr(report_html, "_png", lambda fig: figs.append(fig) or "")
    report_html.loss_curve(str(tmp_path))
    lines = {ln.get_label(): ln for ln in figs[0].axes[0].get_lines()}
    assert set(lines) == {"loss", "val_loss"}
    assert lines["val_loss"].get_marker() == "o" and len(lines["val_loss"].get_xdata()) == 1
