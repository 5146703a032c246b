"""instagan.pool: the history pool shows D old fakes with their own masks, keeps inactive samples out, and resumes
to the same draws."""

import torch

from instagan.pool import HistoryPool


def sample(tag: float, k: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """An image filled with `tag` and k masks filled with tag / 100 + j (so each mask names its image and slot)."""
    return torch.full((3, size, size), tag), torch.stack([torch.full((size, size), tag / 100 + j) for j in range(k)])


def batch(tags: list[float], ks: list[int]):
    imgs, sets = zip(*(sample(t, k) for t, k in zip(tags, ks)))
    n = max(ks)
    masks = torch.full((len(tags), n, 4, 4), -1.0)
    valid = torch.zeros(len(tags), n, dtype=torch.bool)
    for i, m in enumerate(sets):
        masks[i, :len(m)], valid[i, :len(m)] = m, True
    return torch.stack(imgs), masks, valid


def test_until_full_fakes_pass_through_and_are_stored_as_copies():
    pool = HistoryPool(size=3, seed=0)
    img, masks, valid = batch([1.0, 2.0], [1, 3])
    out_img, out_masks, out_valid = pool.query(img, masks, valid, torch.tensor([True, True]))
    assert torch.equal(out_img, img) and torch.equal(out_masks, masks) and torch.equal(out_valid, valid)
    img.add_(5)  # the caller's tensors change; the pool's copies do not
    assert [x[0, 0, 0].item() for x in pool.images] == [1.0, 2.0]
    assert [m.shape[0] for m in pool.masks] == [1, 3]


def test_once_full_about_half_are_swapped_for_stored_samples_with_their_own_masks():
    pool = HistoryPool(size=4, seed=1)
    for t in range(4):
        pool.query(*batch([float(t)], [t % 3 + 1]), torch.tensor([True]))
    swapped, seen = 0, set()
    for t in range(4, 204):
        out_img, out_masks, out_valid = pool.query(*batch([float(t)], [t % 3 + 1]), torch.tensor([True]))
        tag = out_img[0, 0, 0, 0].item()
        k = int(out_valid[0].sum())
        assert k == int(tag) % 3 + 1  # the image comes back with its own mask set (size and values)
        torch.testing.assert_close(out_masks[0, :k, 0, 0], torch.tensor([tag / 100 + j for j in range(k)]))
        assert (out_masks[0, k:] == -1).all()
        swapped += tag != t
        seen.add(tag)
    assert 70 < swapped < 130, swapped  # probability 1/2 per sample
    assert len(pool.images) == 4 and len(seen) > 50


def test_inactive_samples_pass_through_and_are_never_stored():
    pool = HistoryPool(size=2, seed=0)
    for t in range(2):
        pool.query(*batch([float(t)], [1]), torch.tensor([True]))
    stored = [x.clone() for x in pool.images]
    for t in range(10, 40):
        img, masks, valid = batch([float(t), float(t + 100)], [2, 1])
        out_img, out_masks, _ = pool.query(img, masks, valid, torch.tensor([False, False]))
        assert torch.equal(out_img, img) and torch.equal(out_masks, masks)
    assert all(torch.equal(a, b) for a, b in zip(stored, pool.images))


def test_a_restored_pool_draws_what_the_original_draws():
    pool = HistoryPool(size=3, seed=7)
    for t in range(6):
        pool.query(*batch([float(t)], [2]), torch.tensor([True]))
    copy = HistoryPool(size=1, seed=0)
    copy.load_state_dict(pool.state_dict())
    fresh = HistoryPool(size=3, seed=0)
    fresh.load_state_dict({**pool.state_dict(), "gen": HistoryPool(seed=0).gen.get_state()})
    outs = {name: [p.query(*batch([float(t)], [1]), torch.tensor([True]))[0][0, 0, 0, 0].item()
                   for t in range(6, 40)] for name, p in (("orig", pool), ("copy", copy), ("fresh", fresh))}
    assert outs["copy"] == outs["orig"]
    assert outs["fresh"] != outs["orig"]  # the random generator's state is part of what resumes


def test_size_zero_is_no_pool():
    pool = HistoryPool(size=0)
    img, masks, valid = batch([1.0, 2.0], [2, 1])
    out = pool.query(img, masks, valid, torch.tensor([True, True]))
    assert torch.equal(out[0], img) and torch.equal(out[1], masks) and not pool.images
