"""Ablation sweeps: grid parsing, network knobs on ``meddiff train``, and a real 2 × 2 sweep
(schedule × attention) of tiny models on BreastMNIST, judged with one protocol."""

from __future__ import annotations

import pandas as pd
import pytest

from meddiff import storage
from meddiff.analysis.sweep import SweepConfig, best_row, best_sentence, not_separated, parse_grid, table_html
from meddiff.errors import MeddiffError


def test_parse_grid_and_its_errors():
    assert parse_grid(["schedule=linear,cosine", "attention=none,coarse", "channels=16-32,32-64"]) == (
        ("schedule", ("linear", "cosine")), ("attention", ("none", "coarse")), ("channels", ("16-32", "32-64")))
    with pytest.raises(MeddiffError, match="KNOB=v1,v2"):
        parse_grid(["warmth=1,2"])
    with pytest.raises(MeddiffError, match="twice"):
        parse_grid(["schedule=linear", "schedule=cosine"])
    with pytest.raises(MeddiffError, match=r"'abc' is not a valid lr value \(e.g. 2e-4\)"):
        parse_grid(["lr=1e-3,abc"])  # was a ValueError traceback from the middle of the sweep
    with pytest.raises(MeddiffError, match="'16-x' is not a valid channels value"):
        parse_grid(["channels=16-32,16-x"])


def test_a_sweep_that_cannot_rank_or_repeats_a_run_is_refused_before_training(breastmnist_uri):
    """'lr=1e-3,0.001' trained once and ranked the run against itself ("not separated from lr=1e-3");
    --rank-by bits_per_dim with --likelihood-images 0, or with rflow runs only, trained every model
    and then said nothing was ranked."""
    with pytest.raises(MeddiffError, match="lr=1e-3 and lr=0.001 are the same training run"):
        SweepConfig(breastmnist_uri, parse_grid(["lr=1e-3,0.001"])).check()
    with pytest.raises(MeddiffError, match="--rank-by bits_per_dim needs --likelihood-images > 0"):
        SweepConfig(breastmnist_uri, parse_grid(["lr=1e-3,2e-3"]), likelihood_images=0,
                    rank_by="bits_per_dim").check()
    with pytest.raises(MeddiffError, match="at least one ddpm run"):
        SweepConfig(breastmnist_uri, parse_grid(["lr=1e-3,2e-3"]), {"objective": "rflow"},
                    rank_by="bits_per_dim").check()
    assert SweepConfig(breastmnist_uri, parse_grid(["objective=ddpm,rflow"]), rank_by="bits_per_dim").check()


def test_best_row_respects_the_metric_direction():
    rows = [{"kid": 0.3, "label_fidelity": 0.9}, {"kid": 0.1, "label_fidelity": 0.5}, {"kid": None}]
    assert best_row(rows, "kid") == 1 and best_row(rows, "label_fidelity") == 0


def test_the_best_row_is_not_claimed_over_rows_its_interval_overlaps():
    """A sweep of 20-image cohorts ranked linear KID 2126 [1043, 3838] and cosine 1288 [645, 2327] and
    announced 'best by kid: cosine' as if it were settled; the intervals overlap, so the record, the
    page and the sentence say the two are not separated at this n."""
    rows = [{"schedule": "linear", "kid": 2126.0, "kid_ci": [1043.0, 3838.0], "n_synthetic": 20},
            {"schedule": "cosine", "kid": 1288.0, "kid_ci": [645.0, 2327.0], "n_synthetic": 20},
            {"schedule": "sigmoid", "kid": 3900.0, "kid_ci": [3000.0, 4800.0], "n_synthetic": 20},
            {"schedule": "scaled", "kid": 1500.0, "kid_ci": None, "n_synthetic": 20}]
    assert best_row(rows, "kid") == 1 and not_separated(rows, "kid", 1) == [0, 3]  # sigmoid is clear of it
    rec = {"rows": rows, "rank_by": "kid", "config": {"grid": [["schedule", ["linear", "cosine", "sigmoid"]]]}}
    sentence = best_sentence(rec)
    assert sentence.startswith("Best by kid: schedule=cosine, but not separated from schedule=linear, "
                               "schedule=scaled at this n (95 % intervals overlap)")
    page = table_html(rec)
    assert page.count("class=tied") == 2 and page.count("class=best") == 1 and "real val vs train" in page
    clear = {**rec, "rows": rows[1:3] + [{"schedule": "rflow", "kid": None}]}
    assert best_sentence(clear) == ("Best by kid: schedule=cosine — its 95 % interval is clear of every other "
                                    "ranked combination's. Not ranked (no kid): schedule=rflow.")


def test_network_knobs_change_the_run_and_its_network(breastmnist_uri, session_storage):
    from meddiff.train import TrainConfig, plan_run

    base = plan_run(TrainConfig(breastmnist_uri), session_storage)
    same = plan_run(TrainConfig(breastmnist_uri, network_channels=(16, 32), attention_levels="0,0"), session_storage)
    wide = plan_run(TrainConfig(breastmnist_uri, network_channels=(32, 64), attention_levels="coarse"),
                    session_storage)
    assert same.run_id == base.run_id  # the preset's own network spelled out: the same run
    assert wide.run_id != base.run_id
    assert wide.network.channels == (32, 64) and wide.network.attention_levels == (False, True)
    with pytest.raises(MeddiffError, match="attention levels"):
        TrainConfig(breastmnist_uri, attention_levels="0,1,1").check()
    with pytest.raises(MeddiffError, match="give --attention-levels too"):
        TrainConfig(breastmnist_uri, network_channels=(16, 32, 64)).check()


def test_sweep_checks_every_combination_before_training(breastmnist_uri):
    cfg = SweepConfig(breastmnist_uri, parse_grid(["schedule=linear,wiggly"]))
    with pytest.raises(MeddiffError, match="schedule must be one of"):
        cfg.check()


GRID = ["schedule=linear,cosine", "attention=none,coarse"]
SMALL = dict(per_class=12, sample_steps=5, likelihood_images=16, likelihood_timesteps=8, device="cpu")
BASE = {"mode": "conditional", "preset": "tiny", "steps": 20, "batch_size": 16, "objective": "ddpm"}


@pytest.mark.slow
def test_two_by_two_sweep_on_breastmnist(breastmnist_uri, session_storage):
    from meddiff.analysis.sweep import run_sweep

    from told import Told

    cfg = SweepConfig(breastmnist_uri, parse_grid(GRID), BASE, **SMALL)
    told = Told()
    rec = run_sweep(cfg, session_storage, progress=told)
    rows = rec["rows"]
    stages = ["train", "generate", "evaluate", "likelihood"]  # what a user watching the sweep is told first
    assert [t for t in told if t.split(": ", 1)[1] in stages] == [
        f"combination {i} of 4 (schedule={s} attention={a}): {stage}"
        for i, (s, a) in enumerate([("linear", "none"), ("linear", "coarse"), ("cosine", "none"),
                                    ("cosine", "coarse")], 1) for stage in stages]
    assert told.counts and told.counts[-1][0] == told.counts[-1][1]
    assert [(r["schedule"], r["attention"]) for r in rows] == [
        ("linear", "none"), ("linear", "coarse"), ("cosine", "none"), ("cosine", "coarse")]
    assert len({r["model_uri"] for r in rows}) == 4  # four distinct trained models
    for r in rows:
        card = storage.read_json(storage.join(r["model_uri"], "model.json"))
        assert card["network"]["attention_levels"] == ([False, True] if r["attention"] == "coarse" else [False, False])
        assert card["scheduler_config"]["schedule"] == {"linear": "linear_beta", "cosine": "cosine"}[r["schedule"]]
        assert r["n_synthetic"] == 24 and r["kid"] is not None and r["bits_per_dim"] > 0
    best = min(range(4), key=lambda i: rows[i]["kid"])
    assert rec["best"] == {"schedule": rows[best]["schedule"], "attention": rows[best]["attention"]}
    table = pd.read_parquet(storage.join(rec["uri"], "sweep.parquet"))
    assert len(table) == 4 and {"kid", "fid", "label_fidelity", "bits_per_dim"} <= set(table.columns)
    assert rec["inputs"]["dataset_version"] == breastmnist_uri.rstrip("/").rsplit("/", 1)[-1]
    page = storage.read_bytes(storage.join(rec["uri"], "sweep.html")).decode()
    assert "class=best" in page and best_sentence(rec) in page
    assert rec["tied_with_best"] == [{k: rows[i][k] for k in ("schedule", "attention")}
                                     for i in not_separated(rows, "kid", best)]
    told = Told()
    assert run_sweep(cfg, session_storage, progress=told)["created_at"] == rec["created_at"]  # a finished sweep
    assert told == [f"reusing {rec['uri']}/sweep.json: the same sweep finished before"]  # is reused


@pytest.mark.slow
def test_sweep_flow_reuses_the_finished_sweep(prefect_harness, breastmnist_uri, session_storage):
    """The flow with the same parameters finds the sweep the library wrote (runs after the 2 × 2 test)."""
    from flows.sweep import sweep
    from meddiff.analysis.sweep import run_sweep, sweep_uri

    cfg = SweepConfig(breastmnist_uri, parse_grid(GRID), BASE, **SMALL)
    rec = run_sweep(cfg, session_storage)  # finished by the test above: read back, not recomputed
    uri = sweep(breastmnist_uri, GRID, **{k: v for k, v in BASE.items()}, **SMALL, storage_root=session_storage)
    assert uri == rec["uri"] == sweep_uri(cfg, session_storage)
    assert storage.read_json(storage.join(uri, "sweep.json"))["created_at"] == rec["created_at"]


@pytest.mark.parametrize("width", [60, 80, 200])
def test_the_sweep_table_never_cuts_a_figure(monkeypatch, width):
    """At 80 columns the sweep's table cut a KID of 2.004e+04 to '2.004e+…', which read as the 2020 of the
    row below it (the better one). Every figure, interval bound and header now prints whole, the cells
    wrapping at spaces; where the table's longest words are wider than the terminal, it is printed wider."""
    import re

    from typer.testing import CliRunner

    from meddiff.analysis import sweep as sweep_mod
    from meddiff.cli import app

    rows = [{"lr": lr, "n_synthetic": 32, "kid": kid, "kid_ci": ci, "kid_baseline": -0.1648, "fid": 2398.0,
             "fid_ci": [2160.0, 2730.0], "label_fidelity": 0.5, "label_fidelity_ci": [0.336, 0.664],
             "bits_per_dim": 7.235, "bits_per_dim_ci": [7.16, 7.31]}
            for lr, kid, ci in (("1e-3", 20038.01, [15662.19, 26153.4]), ("2e-3", 2020.49, [1342.87, 2894.12]))]
    rec = {"uri": "s3://meddiff/u1/sweeps/breastmnist-8e0de74ca18a", "rows": rows, "rank_by": "kid",
           "config": {"grid": [["lr", ["1e-3", "2e-3"]]]}}
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda *a, **k: rec)
    out = CliRunner().invoke(app, ["sweep", "ds", "--grid", "lr=1e-3,2e-3"], env={"COLUMNS": str(width)})
    assert out.exit_code == 0, out.output
    text = out.output
    assert "…" not in text
    words = set(re.findall(r"[^\s│┃]+", text))
    for figure in ["2.004e+04", "[1.57e+04,", "2.62e+04]", "2020", "[1.34e+03,", "2.89e+03]", "-0.1648",
                   "label_fidelity", "ssim_to_nearest_train", "bits_per_dim", "7.235"]:
        assert figure in words, (figure, text)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= max(width, 110), text  # 110: its longest words, side by side
