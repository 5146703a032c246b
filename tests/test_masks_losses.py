"""Mask helpers and losses on hand-made tensors."""

import torch

from instagan import losses as L
from instagan import masks as M


def _box(h, w, y0, y1, x0, x1):
    m = torch.full((h, w), -1.0)
    m[y0:y1, x0:x1] = 1.0
    return m


def test_sort_by_area_orders_largest_first_padding_last():
    masks = torch.stack([_box(8, 8, 0, 2, 0, 2), _box(8, 8, 0, 8, 0, 8), _box(8, 8, 0, 4, 0, 4),
                         torch.ones(8, 8)])[None]  # last slot: padding full of +1, must stay last
    valid = torch.tensor([[True, True, True, False]])
    out, v, order = M.sort_by_area(masks, valid)
    assert order.tolist() == [[1, 2, 0, 3]]
    assert M.areas(out, v).tolist() == [[64, 16, 4, 0]]
    assert v.tolist() == [[True, True, True, False]]


def test_chunks_pad_to_ins_per_and_count_agrees():
    masks = torch.full((2, 5, 4, 4), -1.0)
    valid = torch.tensor([[True] * 5, [True, False, False, False, False]])
    assert M.num_chunks(valid, 2) == 3
    cm, cv = M.chunk(masks, valid, 2, 2)
    assert cm.shape == (2, 2, 4, 4) and cv.tolist() == [[True, False], [False, False]]
    assert M.num_chunks(torch.zeros(1, 3, dtype=torch.bool), 2) == 1


def test_context_weight_is_one_exactly_where_both_are_background():
    a = _box(6, 6, 0, 3, 0, 3)[None, None]  # original instance: top-left
    b = _box(6, 6, 2, 5, 2, 5)[None, None]  # translated instance: moved and resized
    pad = torch.ones(1, 1, 6, 6)  # an invalid slot full of +1 must not count
    w = M.context_weight(torch.cat([a, pad], 1), torch.tensor([[True, False]]), b, torch.tensor([[True]]))
    expected = ((a < 0) & (b < 0)).float()
    assert w.shape == (1, 1, 6, 6)
    assert torch.equal(w, expected)


def test_union_clamps_overlaps_to_one():
    a = torch.stack([_box(4, 4, 0, 4, 0, 2), _box(4, 4, 0, 4, 1, 3)])[None]
    u = M.union(a, torch.tensor([[True, True]]))
    assert u.max() == 1 and u[0, 0, 0].tolist() == [1, 1, 1, 0]


def test_lsgan_values():
    pred = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 0.5]]]])
    assert L.lsgan(pred, 1.0).tolist() == [0.5, 0.25]
    assert L.lsgan(pred, 0.0).tolist() == [0.5, 0.25]


def test_masked_l1_averages_over_image_and_mask_channels_and_ignores_padding():
    img, ref = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    masks, ref_m = torch.full((1, 2, 2, 2), -1.0), torch.full((1, 2, 2, 2), -1.0)
    masks[0, 0] = 1.0  # valid slot differs by 2 everywhere
    masks[0, 1] = 1.0  # padding slot differs too, but must not count
    out = L.masked_l1(img, masks, torch.tensor([[True, False]]), ref, ref_m)
    # (3 channels * 4 px * 1 + 1 mask * 4 px * 2) / (5 channels * 4 px)
    assert torch.allclose(out, torch.tensor([(12 + 8) / 20]))


def test_context_loss_weights_pixels():
    x, y = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    w = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert torch.allclose(L.context(x, y, w), torch.tensor([0.25]))


def test_weighted_mean_ignores_zero_weight_and_keeps_graph():
    v = torch.tensor([2.0, 100.0], requires_grad=True)
    out = L.weighted_mean(v, torch.tensor([True, False]))
    assert out.item() == 2.0
    zero = L.weighted_mean(v, torch.tensor([False, False]))
    zero.backward()
    assert zero.item() == 0.0 and v.grad.tolist() == [0.0, 0.0]


def test_collate_pads_and_sorts():
    s1 = (torch.zeros(3, 4, 4), torch.stack([_box(4, 4, 0, 1, 0, 1), _box(4, 4, 0, 4, 0, 4)]))
    s2 = (torch.zeros(3, 4, 4), torch.zeros(0, 4, 4))
    batch = M.collate([s1, s2])
    assert batch["masks"].shape == (2, 2, 4, 4)
    assert batch["valid"].tolist() == [[True, True], [False, False]]
    assert M.areas(batch["masks"], batch["valid"]).tolist() == [[16, 1], [0, 0]]


def test_keep_weight_is_one_where_an_instance_stays_itself():
    masks = torch.full((1, 2, 4, 4), -1.0)
    masks[0, 0, :2, :2] = 1  # instance 0: top-left
    masks[0, 1, 2:, 2:] = 1  # instance 1 (a padding slot below)
    out = torch.full((1, 2, 4, 4), -1.0)
    out[0, 0, :2, :3] = 1  # instance 0 grows right
    out[0, 1, :2, :2] = 1  # "instance 1" moves onto instance 0's place: not itself there
    w = M.keep_weight(masks, torch.tensor([[True, False]]), out)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, :2, :2] = 1
    assert torch.equal(w, expected)
    w_both = M.keep_weight(masks, torch.tensor([[True, True]]), out)
    assert torch.equal(w_both, expected)  # instance 1's input and translation do not overlap


def test_cycle_loss_free_of_shape_changes_skips_exactly_the_changed_pixels():
    """masks.shape_change marks the pixels an instance gained or lost (input mask xor its translation, padding
    ignored); the cycle L1 weighted by 1 - that is blind to any reconstruction there and sees every other pixel."""
    masks = torch.full((1, 2, 8, 8), -1.0)
    masks[0, 0, 2:5, 2:5] = 1
    out = masks.clone()
    out[0, 0, 1:6, 1:6] = 0.4  # instance 0 grows by one pixel all round
    out[0, 0, 3, 3] = -0.2  # and loses one pixel
    out[0, 1, :, :] = 1  # a padding slot, ignored
    valid = torch.tensor([[True, False]])
    changed = M.shape_change(masks, valid, out)
    expect = torch.zeros(1, 1, 8, 8)
    expect[0, 0, 1:6, 1:6] = 1
    expect[0, 0, 2:5, 2:5] = 0
    expect[0, 0, 3, 3] = 1
    assert torch.equal(changed, expect)
    x = torch.rand(1, 3, 8, 8)
    rec = x.clone()
    rec[:, :, changed[0, 0] > 0] += 0.7  # wrong only where the shape changed
    base = L.masked_l1(rec, masks, valid, x, masks)
    assert base > 0 and L.masked_l1(rec, masks, valid, x, masks, 1 - changed) == 0
    rec[:, :, 7, 7] += 0.5  # and once elsewhere: seen
    assert L.masked_l1(rec, masks, valid, x, masks, 1 - changed) > 0
