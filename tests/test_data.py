"""Ingest (instagan.data): crops and flips keep image and masks aligned, vanished instances are dropped, unpaired
batches cycle the shorter domain, and the Ray Data path feeds Train workers equal, deadlock-free epochs.
Run: .venv/bin/python -m pytest tests/test_data.py -q   (the Ray tests are marked slow; they run in CI too)
"""

import json
import random
import threading

import numpy as np
import pytest
import torch

from data_prep.synthetic import write_synthetic
from instagan.data import LocalDataset, augment, local_batches, pair_rows, prefetch, read_sample, sample_generator
from instagan.distributed.data import iter_pairs, ray_datasets

RED, GREEN = (255, 0, 0), (0, 255, 0)


def scene(h=64, w=64, squares=((RED, 10, 30, 6, 22),)):
    """A background with a left-to-right ramp in the blue channel and coloured squares; masks drawn from them."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 1] = 60
    img[..., 2] = np.linspace(0, 200, w, dtype=np.uint8)[None]
    masks = []
    for colour, y0, y1, x0, x1 in squares:
        img[y0:y1, x0:x1] = colour
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
        masks.append(m)
    return img, np.stack(masks)


def is_colour(x, colour):
    want = torch.tensor(colour).float() / 127.5 - 1
    return (x - want[:, None, None]).abs().amax(0) < 1e-6


def test_crop_and_flip_keep_masks_on_the_pixels_they_mark():
    img, masks = scene()
    flipped, kept = set(), 0
    for s in range(40):
        x, m = augment(img, masks, size=40, load_size=64, flip=True, generator=torch.Generator().manual_seed(s))
        assert x.shape == (3, 40, 40) and x.min() >= -1 and x.max() <= 1
        red = is_colour(x, RED)
        if m.shape[0]:
            assert torch.equal(red, m[0] > 0)  # exact: resize is a no-op at load_size 64, crop/flip move pixels
            assert set(m.unique().tolist()) <= {-1.0, 1.0}
            kept += 1
        else:
            assert not red.any()
        flipped.add(bool(x[2, 0, 0] > x[2, 0, -1]))  # the blue ramp runs right to left after a flip
    assert flipped == {True, False}
    assert kept >= 20  # most crops keep the square: the alignment check above really ran


def test_resize_crop_flip_alignment_with_interpolation():
    img, masks = scene(60, 90, ((RED, 10, 40, 20, 50),))
    ious = []
    for s in range(10):
        x, m = augment(img, masks, size=48, load_size=56, flip=True, generator=torch.Generator().manual_seed(s))
        red = (x[0] > 0.5) & (x[1] < -0.2)
        if m.shape[0]:
            ious.append(((red & (m[0] > 0)).sum() / (red | (m[0] > 0)).sum()).item())
        else:
            assert not red.any()  # the square left the crop with its mask
    assert len(ious) >= 8, ious  # the square (a third of the image) survives most crops: the check really ran
    assert min(ious) > 0.85, ious


def test_instances_that_leave_the_crop_are_dropped():
    img, masks = scene(squares=((RED, 16, 48, 16, 48), (GREEN, 0, 4, 0, 4)))  # big centre square, tiny corner one
    counts = set()
    for s in range(60):
        x, m = augment(img, masks, size=32, load_size=64, flip=True, generator=torch.Generator().manual_seed(s))
        assert (m > 0).flatten(1).any(1).all()  # no empty instance survives
        assert m.shape[0] == 1 + int(is_colour(x, GREEN).any())
        counts.add(m.shape[0])
    assert 1 in counts  # the corner square fell out of some crops
    x, m = augment(img, masks[1:], size=32, load_size=64, flip=False, generator=torch.Generator().manual_seed(1))
    assert m.shape[0] in (0, 1) and m.shape[1:] == (32, 32)  # K' may be 0


def test_eval_resize_and_seeding():
    img, masks = scene(60, 90)
    x, m = augment(img, masks, size=32, load_size=40, flip=True, train=False)
    assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = augment(img, masks, 32, 48, True, sample_generator(0, 0, "a", "x"))
    assert torch.equal(torch.get_rng_state(), state)  # a generator leaves the global RNG alone
    b = augment(img, masks, 32, 48, True, sample_generator(0, 0, "a", "x"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [augment(img, masks, 32, 48, True, sample_generator(0, e, "a", "x"))[0] for e in range(1, 6)]
    assert any(not torch.equal(a[0], o) for o in others)


def test_pair_rows_cycles_the_shorter_domain():
    pairs = list(pair_rows(range(7), "xyz", random.Random(0)))
    assert [p[0] for p in pairs] == list(range(7))
    b = [p[1] for p in pairs]
    assert b[:3] == list("xyz") and sorted(b[3:6]) == list("xyz") and b[6] in "xyz"
    assert [p[3] for p in pairs] == [0, 0, 0, 1, 1, 1, 2] and {p[2] for p in pairs} == {0}
    assert [p[:2] for p in pair_rows("ab", range(5), random.Random(0))][:2] == [("a", 0), ("b", 1)]
    assert len(list(pair_rows("ab", "cd", random.Random(0)))) == 2
    assert list(pair_rows([], [], random.Random(0))) == []
    with pytest.raises(ValueError, match="domain b has no rows"):
        list(pair_rows([1, 2], [], random.Random(0)))


def test_prefetch_keeps_order_and_errors():
    assert list(prefetch(iter(range(50)), 3)) == list(range(50))

    def broken():
        yield 1
        raise RuntimeError("bad shard")

    it = prefetch(broken(), 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad shard"):
        next(it)
    early = prefetch(iter(range(10**6)), 2)
    assert next(early) == 0
    early.close()  # leaving early stops the thread instead of hanging


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, n=10, n_b=5, size=48, seed=1, test_fraction=0.0, ins=(1, 5))
    return root


def test_local_dataset(synth):
    ds = LocalDataset(synth, "train", "a", size=32, load_size=40, flip=True, seed=0)
    assert len(ds) == 10 and len(ds.ids) == 10
    img, masks = ds[3]
    assert img.shape == (3, 32, 32) and masks.ndim == 3 and masks.shape[1:] == (32, 32)
    again = ds[3][0]
    ds.set_epoch(1)
    assert torch.equal(img, again) and not torch.equal(img, ds[3][0])
    raw_img, raw_masks = read_sample(ds.row(3))
    assert raw_img.shape == (48, 48, 3) and raw_masks.dtype == bool


def test_local_batches_unpaired_epoch(synth):
    batches = list(local_batches(synth, "train", batch_size=4, size=32, load_size=40, flip=True, seed=0, epoch=0))
    assert [len(a["id"]) for a, _ in batches] == [4, 4, 2]  # the epoch covers the longer domain (10 a)
    ids_a = [i for a, _ in batches for i in a["id"]]
    ids_b = [i for _, b in batches for i in b["id"]]
    assert sorted(ids_a) == sorted(set(ids_a)) and len(ids_a) == 10
    assert sorted(ids_b.count(i) for i in set(ids_b)) == [2, 2, 2, 2, 2]  # 5 b images, cycled twice
    for batch in (b for pair in batches for b in pair):
        img, masks, valid = batch["img"], batch["masks"], batch["valid"]
        assert img.shape[1:] == (3, 32, 32) and img.min() >= -1 and img.max() <= 1
        assert masks.shape[:2] == valid.shape and masks.shape[1] >= 1
        assert set(masks.unique().tolist()) <= {-1.0, 1.0}
        assert (masks[~valid] == -1).all()
        area = ((masks > 0).sum((-1, -2)) * valid).tolist()
        assert all(row == sorted(row, reverse=True) for row in area)  # largest first, padding last
        assert all((valid[i, :-1].int() >= valid[i, 1:].int()).all() for i in range(len(valid)))
    capped = next(local_batches(synth, "train", 4, 32, 40, True, 0, 0, ins_cap=1))
    assert capped[0]["masks"].shape[1] == 1 and capped[1]["valid"].shape[1] == 1
    same = next(local_batches(synth, "train", 4, 32, 40, True, 0, 0, prefetch_batches=0))
    assert torch.equal(same[0]["img"], batches[0][0]["img"]) and same[0]["id"] == batches[0][0]["id"]
    other = next(local_batches(synth, "train", 4, 32, 40, True, 0, epoch=1))
    assert other[0]["id"] != batches[0][0]["id"]  # a new epoch reshuffles


def test_real_photos_end_to_end(tmp_path):
    from pathlib import Path

    from data_prep.cli import main

    shp = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "shp2gir_coco_sample"
    assert main(["folder", str(shp), "--out", str(tmp_path), "--quiet", "--workers", "1"]) == 0
    seen = 0
    for a, b in local_batches(tmp_path, "sample", 3, 64, 72, True, seed=0, epoch=0, ins_cap=4):
        for batch in (a, b):
            assert batch["img"].shape[1:] == (3, 64, 64) and 1 <= batch["masks"].shape[1] <= 4
            assert batch["valid"].any(1).all()  # large instances survive a 64/72 crop
        seen += len(a["id"])
    assert seen == 7


# ---- Ray Data -> Ray Train workers ----------------------------------------------------------------------------

@pytest.mark.slow
def test_iter_pairs_two_ranks_equal_and_deadlock_free(ray_local, synth):
    ds = ray_datasets(str(synth), "train")
    shards = {d: v.streaming_split(2, equal=True) for d, v in ds.items()}
    out, errors = {}, []

    def rank_loop(r):
        try:
            out[r] = [[(a["id"], b["id"], a["masks"].shape[1]) for a, b in
                       iter_pairs(shards["a"][r], shards["b"][r], 2, 32, 40, True, seed=0, epoch=e, rank=r)]
                      for e in range(2)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank_loop, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads), "a rank hung or failed"
    for e in range(2):
        assert len(out[0][e]) == len(out[1][e]) == 3  # 5 a rows per rank, batches of 2
        ids_a = sorted(i for r in (0, 1) for a, _, _ in out[r][e] for i in a)
        assert ids_a == sorted(f"{i:06d}" for i in range(10))  # one epoch covers every a image once
        ids_b = [i for r in (0, 1) for _, b, _ in out[r][e] for i in b]
        assert set(ids_b) <= {f"{i:06d}" for i in range(5)} and len(ids_b) == 10


def _train_loop(cfg):
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    sa, sb = ray.train.get_dataset_shard("a"), ray.train.get_dataset_shard("b")
    epochs = []
    for epoch in range(2):
        epochs.append([(a["id"], b["id"], list(a["img"].shape), a["valid"].sum().item())
                       for a, b in iter_pairs(sa, sb, 2, 32, 40, True, seed=0, epoch=epoch, ins_cap=3)])
    with open(f"{cfg['out']}/rank{rank}.json", "w") as f:
        json.dump(epochs, f)


@pytest.mark.slow
def test_train_workers_get_equal_shards(ray_local, synth, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    datasets = ray_datasets(str(synth), "train", materialize=True)  # also covers the cached path
    TorchTrainer(_train_loop, train_loop_config={"out": str(tmp_path)}, datasets=datasets,
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name="data_shards", storage_path=str(tmp_path / "runs"))).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for e in range(2):
        assert len(ranks[0][e]) == len(ranks[1][e]) == 3
        ids_a = sorted(i for rk in ranks for a, _, _, _ in rk[e] for i in a)
        assert ids_a == sorted(f"{i:06d}" for i in range(10))
        assert all(shape[1:] == [3, 32, 32] for rk in ranks for _, _, shape, _ in rk[e])
