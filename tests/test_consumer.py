"""Class mix as training and downstream consumers read it; per-epoch shuffling; worker/rank splits; map-style
access; the README's downstream snippet, run as written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.data.consumer import ShardDataset, epoch_order, reader_part
from meddiff.data.ingest import IngestConfig, ingest
from meddiff.data.shards import open_dataset
from meddiff.errors import MeddiffError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def largest_class_share(labels: np.ndarray, batch: int) -> float:
    """Mean over full batches of the largest class's share of the batch."""
    n = len(labels) // batch
    return float(np.mean([np.bincount(b).max() / batch for b in labels[: n * batch].reshape(n, batch)]))


def iid_share(labels: np.ndarray, batch: int, trials: int = 4000) -> float:
    """The same statistic for batches drawn i.i.d. from the labels' class proportions."""
    p = np.bincount(labels) / len(labels)
    draws = np.random.default_rng(0).multinomial(batch, p, size=trials)
    return float((draws.max(1) / batch).mean())


@pytest.fixture(scope="module")
def blood_by_class(medmnist_dir, tmp_path_factory) -> Path:
    """A class-ordered folder source of real BloodMNIST images: 3 class folders × 1,000 PNGs."""
    root = tmp_path_factory.mktemp("blood-folder")
    with np.load(medmnist_dir / "bloodmnist.npz") as z:
        x, y = z["train_images"], z["train_labels"].reshape(-1)
    for c in (1, 3, 6):
        (root / f"class{c}").mkdir()
        for j, i in enumerate(np.flatnonzero(y == c)[:1000]):
            Image.fromarray(x[i]).save(root / f"class{c}" / f"{j:04d}.png")
    return root


def _class_ordered_copy(uri: str, dest: Path) -> str:
    """The same version with its train shards re-packed class by class (how archives were written before)."""
    import shutil

    from meddiff.data.shards import encode_sample, iter_shard, write_shard

    shutil.copytree(uri, dest)
    shards = open_dataset(str(dest)).shard_uris("train")
    samples = sorted((s for u in shards for s in iter_shard(u)), key=lambda s: (int(s["cls"]), s["__key__"]))
    size = -(-len(samples) // len(shards))
    for k, u in enumerate(shards):
        write_shard(Path(u), [encode_sample(s["__key__"], s["png"], int(s["cls"]), {})
                              for s in samples[k * size:(k + 1) * size]])
    return str(dest)


def test_training_batches_mix_classes_like_iid(blood_by_class, tmp_path):
    """A class-ordered archive, ingested, then read exactly as training reads it. The shuffle buffer is scaled
    with the data: 2,100 images and a 200-sample buffer stand for 21,000 images and training's default 2,000."""
    from meddiff.train.batches import DataSpec, batches

    r = ingest(IngestConfig(f"folder:{blood_by_class}", size=28, shard_size=500), str(tmp_path))
    assert r.card["order"]["shuffled"] and r.card["order"]["shuffle_seed"] == 0
    assert r.card["duplicates"]["dropped_copies"] == 2  # BloodMNIST's own exact copies among these 3,000
    assert r.card["totals"]["train"] == 2098
    spec = DataSpec(shuffle_buffer=200)

    def share(uri: str) -> tuple[float, float]:
        stream = batches(open_dataset(uri), spec, batch_size=32, seed=0, start_step=0)
        labels = np.concatenate([next(stream)[1].numpy() for _ in range(2100 // 32)])
        return largest_class_share(labels, 32), iid_share(labels, 32)

    measured, iid = share(r.uri)
    assert abs(measured - iid) < 0.1, (measured, iid)
    # the same images stored class by class fail the same check: the test sees class-blocked batches
    blocked, _ = share(_class_ordered_copy(r.uri, tmp_path / "ordered"))
    assert blocked > iid + 0.3, (blocked, iid)
    idx = open_dataset(r.uri).index()  # and every training shard holds every class
    assert (idx[idx.split == "train"].groupby("shard").label.nunique() == 3).all()


@pytest.fixture(scope="module")
def small_sharded(medmnist_dir, tmp_path_factory) -> str:
    """BreastMNIST with 100-sample shards (546 train → 6 shards)."""
    root = tmp_path_factory.mktemp("small-sharded")
    return ingest(IngestConfig("medmnist:breastmnist", medmnist_root=str(medmnist_dir), shard_size=100),
                  str(root)).uri


def digests(items) -> list[str]:
    return [hashlib.sha256(x.numpy().tobytes() + bytes([y])).hexdigest() for x, y in items]


def test_epochs_reshuffle_shards_and_samples(small_sharded):
    ds = ShardDataset(small_sharded)
    assert len(ds) == 546
    first = digests(ds)
    assert digests(ds) == first  # same epoch, same order
    ds.set_epoch(1)
    second = digests(ds)
    assert sorted(second) == sorted(first) and len(set(first)) == 546 and second != first
    # shard order changes too, not only the order inside shards
    o0, o1 = epoch_order(ds.sources, 0, 0), epoch_order(ds.sources, 0, 1)
    shards = lambda o: list(dict.fromkeys(s for s, _ in o))  # noqa: E731
    assert sorted(shards(o0)) == sorted(shards(o1)) and shards(o0) != shards(o1)


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 4), (1, 8)])
def test_reader_parts_are_disjoint_and_ranks_equal(small_sharded, world, workers):
    order = epoch_order(ShardDataset(small_sharded).sources, 0, 3)
    parts = {(r, w): reader_part(order, r, world, w, workers) for r in range(world) for w in range(workers)}
    seen = [e for p in parts.values() for e in p]
    assert len(seen) == len(set(seen)) == len(order) // world * world
    per_rank = [sum(len(parts[r, w]) for w in range(workers)) for r in range(world)]
    assert per_rank == [len(order) // world] * world  # no rank waits on another (no DDP hang)


WORKER_SCRIPT = """
import hashlib, json, sys, torch
from meddiff.data import ShardDataset
out = {}
for uri in sys.argv[1:]:
    for world in (1, 2):
        for rank in range(world):
            ds = ShardDataset(uri, rank=rank, world_size=world)
            ds.set_epoch(5)
            loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, timeout=120)
            keys = [hashlib.sha256(x.numpy().tobytes()).hexdigest() for xb, _ in loader for x in xb]
            out[f"{uri}|{world}-{rank}"] = {"keys": keys, "len": len(ds)}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_two_dataloader_workers_and_two_ranks(small_sharded, breastmnist_uri):
    """Forked DataLoader workers, from a fresh interpreter (not the pytest process hosting Prefect's server);
    six shards (workers take whole shards) and one shard (workers take every other sample)."""
    proc = subprocess.run([sys.executable, "-c", WORKER_SCRIPT, small_sharded, breastmnist_uri], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for uri in (small_sharded, breastmnist_uri):
        alone = out[f"{uri}|1-0"]["keys"]
        assert len(alone) == len(set(alone)) == out[f"{uri}|1-0"]["len"] == 546  # 2 workers: each sample once
        r0, r1 = out[f"{uri}|2-0"]["keys"], out[f"{uri}|2-1"]["keys"]
        assert len(r0) == len(r1) == out[f"{uri}|2-0"]["len"] == 273 and not set(r0) & set(r1)
        assert set(r0) | set(r1) == set(alone)


SPAWN_SCRIPT = """
import hashlib, json, sys, tempfile, torch
import torch.distributed as dist
from meddiff.data import ShardDataset

def digest(loader):
    return [hashlib.sha256(x.numpy().tobytes()).hexdigest() for xb, _ in loader for x in xb]

def rank_main(rank, uri, store, out):
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    ds = ShardDataset(uri)  # rank and world from torch.distributed, as a DDP script writes it
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context="spawn")
    json.dump({"keys": digest(loader), "len": len(ds)}, open(out + str(rank), "w"))
    dist.destroy_process_group()

if __name__ == "__main__":
    uri, d = sys.argv[1], tempfile.mkdtemp()
    ds = ShardDataset(uri)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        epochs.append(digest(loader))
    torch.multiprocessing.spawn(rank_main, args=(uri, d + "/store", d + "/out"), nprocs=2)
    ranks = [json.load(open(d + "/out" + str(r))) for r in (0, 1)]
    print(json.dumps({"epochs": epochs, "in_process": [digest((ds.set_epoch(e) or ds)) for e in (0, 1)], "ranks": ranks}))
"""


@pytest.mark.slow
def test_persistent_workers_follow_set_epoch_and_spawned_workers_keep_their_rank(small_sharded, tmp_path):
    """Persistent DataLoader workers (a copy of the dataset made once) still reshuffle at set_epoch; under
    DDP, spawned workers (no process group of their own) read only their rank's part."""
    script = tmp_path / "ddp_spawn.py"  # a file: spawned processes import their target from __main__'s file
    script.write_text(SPAWN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), small_sharded], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    e0, e1 = out["epochs"]
    assert e0 != e1 and sorted(e0) == sorted(e1) and len(set(e0)) == 546  # epoch 1 is not epoch 0 again
    assert [sorted(e) for e in out["epochs"]] == [sorted(e) for e in out["in_process"]]
    r0, r1 = (r["keys"] for r in out["ranks"])
    assert len(r0) == len(r1) == out["ranks"][0]["len"] == 273  # not 546 each
    assert not set(r0) & set(r1) and set(r0) | set(r1) == set(e0)


def test_map_style_random_access_and_shuffling_loader(small_sharded):
    ds = ShardDataset(small_sharded, split="val")
    mds = ds.as_map()
    assert len(mds) == len(ds) == 78
    streamed = sorted(digests(ds))
    assert sorted(digests(mds[i] for i in range(len(mds)))) == streamed
    x, y = mds[77]
    assert tuple(x.shape) == (1, 28, 28) and x.dtype == torch.float32 and y in (0, 1)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(mds, batch_size=13, shuffle=True)
    got = [(xb[i], int(yb[i])) for xb, yb in loader for i in range(len(yb))]
    assert sorted(digests(got)) == streamed and digests(got) != digests(mds[i] for i in range(len(mds)))


def test_transforms_apply_to_every_yielded_sample(small_sharded):
    """transform / target_transform (torchvision's convention) on the stream and on the map-style view."""
    plain = ShardDataset(small_sharded, split="val")
    flipped = ShardDataset(small_sharded, split="val", transform=lambda x: x.flip(-1),
                           target_transform=lambda y: 1 - y)
    a, b = list(plain), list(flipped)
    assert len(a) == len(b) == 78
    assert all(torch.equal(xb, xa.flip(-1)) and yb == 1 - ya for (xa, ya), (xb, yb) in zip(a, b))
    xm, ym = flipped.as_map()[5]
    xp, yp = plain.as_map()[5]
    assert torch.equal(xm, xp.flip(-1)) and ym == 1 - yp


def test_a_selection_of_nothing_is_an_error_not_an_empty_loader(small_sharded, tmp_path):
    from cohort_factory import make_cohort

    ds = open_dataset(small_sharded)
    x, y = ds.load_split("val")
    cohort = make_cohort(tmp_path / "c1", small_sharded, ds.class_names, x[:10], np.zeros(10, dtype=int))
    assert len(ShardDataset(cohort, classes=[0])) == len(ShardDataset(cohort, classes="malignant")) == 10
    with pytest.raises(MeddiffError, match=r"unknown class id 5; ids are 0\.\.1 for \['malignant', 'normal, benign'\]"):
        ShardDataset(cohort, classes=[5])
    with pytest.raises(MeddiffError, match=r"split must be one of train, val, test, got 'tset'"):
        ShardDataset(small_sharded, split="tset")
    with pytest.raises(MeddiffError, match=r"no images in .*c1 with split='train', classes=\['normal, benign'\]"):
        ShardDataset(cohort, classes=["normal, benign"])  # only class 0 was generated
    card = json.loads((tmp_path / "c1" / "cohort.json").read_text())
    (tmp_path / "c1" / "cohort.json").write_text(json.dumps({**card, "unconditional": True}))
    with pytest.raises(MeddiffError, match=r"sampled without labels .* select by the manifest's oracle_class_id"):
        ShardDataset(cohort, classes=[0])
    assert len(ShardDataset(cohort)) == 10


def test_damaged_shard_is_named(small_sharded, tmp_path):
    import shutil

    from meddiff.errors import ArtifactError

    copy = tmp_path / "copy"
    shutil.copytree(small_sharded, copy)
    victim = sorted(copy.glob("val-*.tar"))[0]
    import tarfile

    with tarfile.open(victim) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(victim, "w") as t:
        for m, data in members:
            if not m.name.endswith(".cls"):
                import io

                t.addfile(m, io.BytesIO(data))
    with pytest.raises(ArtifactError, match=r"val-000000\.tar: sample .* lacks \['cls'\]"):
        list(ShardDataset(str(copy), split="val"))


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## For downstream ML teams", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_downstream_snippet_runs(bloodmnist_uri, tmp_path):
    """The README's code, as written (4 DataLoader workers), on a cohort of real BloodMNIST images."""
    from cohort_factory import make_cohort

    ds = open_dataset(bloodmnist_uri)
    x, y = ds.load_split("val")
    cohort = make_cohort(tmp_path / "cohorts" / "c1", bloodmnist_uri, ds.class_names, x[:300], y[:300],
                         shard_size=100)
    code = readme_snippet().replace("storage/cohorts/<cohort-id>", cohort)
    code = code.replace("storage/datasets/bloodmnist/<version>", bloodmnist_uri)
    assert "<" not in code.replace("<=", ""), "unresolved placeholder in the README snippet"
    check = """
import json
seen = {}
for epoch in range(2):
    ds.set_epoch(epoch)
    seen[epoch] = [int(v) for _, yb in torch.utils.data.DataLoader(ds, batch_size=32) for v in yb]
maps = [int(v) for _, yb in loader for v in yb]
print(json.dumps({"e0": seen[0], "e1": seen[1], "map": maps, "n": len(ds)}))
"""
    proc = subprocess.run([sys.executable, "-c", code + check], env=ENV, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == 600 and len(out["e0"]) == len(out["e1"]) == len(out["map"]) == 600  # 300 syn + 300 real
    assert sorted(out["e0"]) == sorted(out["e1"]) == sorted(out["map"]) and out["e0"] != out["e1"]
    labels = np.array(out["e0"])
    assert abs(largest_class_share(labels, 32) - iid_share(labels, 32)) < 0.1


def test_mixing_images_of_another_size_is_refused_up_front(leukemia_zip, tmp_path):
    """Real blood smears ingested at 32 px and at 16 px: mixing them, or a cohort of the 32 px version
    with the 16 px one, is one clear error at construction, not a collate failure in the middle of an epoch."""
    from cohort_factory import make_cohort

    at32, at16 = (ingest(IngestConfig(f"zip:{leukemia_zip}", size=s, classes="Original/Benign=benign,Original/Pro=pro"),
                         str(tmp_path / f"st{s}")).uri for s in (32, 16))
    ds = open_dataset(at32)
    x, y = ds.load_split("train")
    cohort = make_cohort(tmp_path / "cohorts" / "c1", at32, ds.class_names, x[:20], y[:20])
    for primary in (cohort, at32):
        with pytest.raises(MeddiffError, match=r"its images are 3×16×16 \(channels×px\), .* 3×32×32; mix a version"):
            ShardDataset(primary, mix_with=at16, mix_ratio=0.5)
    mixed = ShardDataset(cohort, mix_with=at32, mix_ratio=0.5)  # the same shape: mixed
    assert len(mixed) == 40 and {tuple(x.shape) for x, _ in mixed} == {(3, 32, 32)}
    # more real images than the split holds: the error says which mix_ratio fits (it only said "asks for 180")
    have = int((ds.index()["split"] == "train").sum())
    with pytest.raises(MeddiffError, match=rf"asks for 180 real images but .* \(train\) has {have}: mix_ratio ≤ "
                                           rf"0\.\d+ fits them to these 20 images") as refused:
        ShardDataset(cohort, mix_with=at32, mix_ratio=0.9)
    fits = float(str(refused.value).split("≤ ")[1].split()[0])
    assert len(ShardDataset(cohort, mix_with=at32, mix_ratio=fits)) <= 20 + have
    # one without the other mixed nothing in, silently (mix_ratio defaults to 0): 20 images, not 40
    for half in (dict(mix_with=at32), dict(mix_ratio=0.5)):
        with pytest.raises(MeddiffError, match=r"give both to mix real images in .*, or neither"):
            ShardDataset(cohort, **half)


def test_a_cohort_copied_away_from_its_storage_still_mixes(leukemia_zip, tmp_path, monkeypatch):
    """The cohort's card names its dataset on an object store this machine cannot reach: the shape check
    is skipped (not an error), as nothing else here needs that store."""
    from cohort_factory import make_cohort

    at32 = ingest(IngestConfig(f"zip:{leukemia_zip}", size=32, classes="Original/Benign=benign,Original/Pro=pro"),
                  str(tmp_path / "st")).uri
    ds = open_dataset(at32)
    x, y = ds.load_split("train")
    cohort = make_cohort(tmp_path / "c1", at32, ds.class_names, x[:20], y[:20])
    card = json.loads((tmp_path / "c1" / "cohort.json").read_text())
    (tmp_path / "c1" / "cohort.json").write_text(json.dumps({**card, "dataset_uri": "s3://elsewhere/d/v1"}))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: the store is unreachable
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert len(ShardDataset(cohort, mix_with=at32, mix_ratio=0.5)) == 40


def test_write_order_interleaves_every_window():
    from meddiff.data.cohorts import write_order

    class_of = np.repeat(np.arange(4), [500, 250, 200, 50])  # sample ids are class-major
    order = write_order(class_of, seed=3)
    assert sorted(order.tolist()) == list(range(1000)) and not np.array_equal(order, np.sort(order))
    expected = np.bincount(class_of) / 1000
    for k in range(0, 1000, 100):  # any shard of 100 holds each class ∝ its size, ± 1
        assert np.abs(np.bincount(class_of[order[k:k + 100]], minlength=4) - 100 * expected).max() <= 1
    assert np.array_equal(write_order(class_of, 3), order) and not np.array_equal(write_order(class_of, 4), order)


def test_generated_cohort_is_written_class_interleaved(tiny_conditional_model_uri, tmp_path):
    from meddiff.data.cohorts import open_cohort, verify
    from meddiff.generate import CohortSpec, generate

    r = generate(CohortSpec(tiny_conditional_model_uri, per_class=8, steps=2, batch_size=16, shard_size=16,
                            device="cpu"), str(tmp_path))
    assert r.card["write_order"] == "interleaved" and verify(r.uri).ok
    df = open_cohort(r.uri).manifest()
    assert (df.groupby("shard").class_id.nunique() == 8).all()  # 4 shards of 16: every class, twice, in each
    assert (df.sort_values("sample_id").class_id.to_numpy() == np.repeat(np.arange(8), 8)).all()  # ids keep meaning
    labels = np.array([y for _, y in ShardDataset(r.uri)])
    # every shard is stratified, so batches are at least as mixed as i.i.d. draws (here exactly 2 per class)
    assert largest_class_share(labels, 16) - iid_share(labels, 16) < 0.1
