"""Instance-mask conventions and helpers: ordering by area, chunking, union, context weight.

Conventions, used everywhere in `instagan`:
- masks: float tensor (B, N, H, W) in [-1, 1]; +1 marks the instance, -1 background (the authors' convention,
  and the range of the generator's tanh output).
- valid: bool tensor (B, N); False marks a padding slot. A padding slot is ignored by every network and loss
  and comes out of the generator as an all -1 (empty) mask. Padding is never mistaken for an instance,
  whatever its pixel values.
- Within an image, instances are ordered by decreasing area with valid slots first (`sort_by_area`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def areas(masks: Tensor, valid: Tensor) -> Tensor:
    """Pixel count of each instance, 0 for padding. (B, N, H, W), (B, N) -> (B, N) int64."""
    return ((masks > 0).sum(dim=(-1, -2)) * valid).long()


def sort_by_area(masks: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Order each image's instances by decreasing area, padding last (stable for ties).

    (B, N, H, W), (B, N) -> (masks, valid, order) where order (B, N) holds the source slot of each output slot.
    """
    key = areas(masks, valid).masked_fill(~valid, -1)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    idx = order[:, :, None, None].expand_as(masks)
    return masks.gather(1, idx), valid.gather(1, order), order


def limit(masks: Tensor, valid: Tensor, ins_max: int) -> tuple[Tensor, Tensor]:
    """Keep the first `ins_max` slots (the largest instances after `sort_by_area`)."""
    return masks[:, :ins_max], valid[:, :ins_max]


def num_chunks(valid: Tensor, ins_per: int) -> int:
    """Chunks of `ins_per` needed to cover the image with the most valid instances (>= 1).

    This is the count a data-parallel job must agree on (all-reduce max) before a step: every rank then runs the
    same number of chunk steps. Valid slots must come first in each row (as `sort_by_area` leaves them).
    """
    most = int(valid.sum(dim=1).max()) if valid.numel() else 0
    return max(1, -(-most // ins_per))


def chunk(masks: Tensor, valid: Tensor, m: int, ins_per: int) -> tuple[Tensor, Tensor]:
    """Chunk m: slots [m * ins_per, (m + 1) * ins_per), padded with invalid empty slots to exactly `ins_per`.

    (B, N, H, W), (B, N) -> (B, ins_per, H, W), (B, ins_per). A fixed width keeps loss denominators equal to the
    authors' (they always feed ins_per channels, empty ones at -1).
    """
    part_m, part_v = masks[:, m * ins_per:(m + 1) * ins_per], valid[:, m * ins_per:(m + 1) * ins_per]
    short = ins_per - part_v.shape[1]
    if short > 0:
        b, _, h, w = masks.shape
        part_m = torch.cat([part_m, masks.new_full((b, short, h, w), -1.0)], dim=1)
        part_v = torch.cat([part_v, valid.new_zeros((b, short))], dim=1)
    return part_m, part_v


def union(masks: Tensor, valid: Tensor) -> Tensor:
    """Soft union of the valid instances in [0, 1]: clamp(sum((m + 1) / 2)). (B, N, H, W) -> (B, 1, H, W)."""
    fg = (masks + 1) / 2 * valid[:, :, None, None].to(masks.dtype)
    return fg.sum(dim=1, keepdim=True).clamp(0, 1)


def as_union(masks: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """All of an image's instances as ONE instance, their union (the CycleGAN baselines' view of the masks).

    (B, N, H, W), (B, N) -> masks (B, 1, H, W) in [-1, 1], valid (B, 1): False for an image without instances.
    """
    return union(masks, valid) * 2 - 1, valid.any(1, keepdim=True)


def context_weight(masks: Tensor, valid: Tensor, out_masks: Tensor, out_valid: Tensor) -> Tensor:
    """Weight of the context-preserving loss: 1 where a pixel is background in both the original and the
    translated masks, 0 where either marks an instance (soft in between, as in the authors' code).

    (B, N, H, W), (B, N), (B, M, H, W), (B, M) -> (B, 1, H, W).
    """
    return 1 - union(torch.cat([masks, out_masks], 1), torch.cat([valid, out_valid], 1))


def keep_weight(masks: Tensor, valid: Tensor, out_masks: Tensor) -> Tensor:
    """Where an instance stays itself: sum over valid instances n of relu(mask_n) * relu(translated mask_n),
    clamped to 1 (1 inside both an input mask and its own translation, 0 outside either).
    (B, N, H, W), (B, N), (B, N, H, W) -> (B, 1, H, W)."""
    both = masks.float().clamp(min=0) * out_masks.float().clamp(min=0) * valid[:, :, None, None].float()
    return both.sum(1, keepdim=True).clamp(max=1)


def shape_change(masks: Tensor, valid: Tensor, out_masks: Tensor) -> Tensor:
    """Where a translation changed an instance's shape: 1 where some valid instance n is in its input mask and not
    in its translated mask or the other way round (both read as > 0), else 0. (B, N, H, W), (B, N), (B, N, H, W)
    -> (B, 1, H, W) fp32. What lay behind a grown object, or under a shrunk one, cannot be reconstructed."""
    flip = (masks > 0) != (out_masks > 0)
    return (flip & valid[:, :, None, None]).any(1, keepdim=True).float()


def pad_sets(sets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Mask sets of different sizes [(K_i, H, W)] -> (B, N, H, W) masks, (B, N) valid: each set in its own order,
    padded to N = max(1, max K_i) with invalid empty (-1) slots; on the sets' device and dtype."""
    n = max(1, max(m.shape[0] for m in sets))
    first = sets[0]
    masks = first.new_full((len(sets), n, *first.shape[-2:]), -1.0)
    valid = torch.zeros(len(sets), n, dtype=torch.bool, device=first.device)
    for i, m in enumerate(sets):
        masks[i, :m.shape[0]] = m
        valid[i, :m.shape[0]] = True
    return masks, valid


def collate(samples: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Stack (image, masks) samples with different instance counts: pad to the largest count with invalid empty
    slots and order each image's instances by decreasing area. -> {"img", "masks", "valid"}."""
    masks, valid = pad_sets([m.float() for _, m in samples])
    masks, valid, _ = sort_by_area(masks, valid)
    return {"img": torch.stack([x for x, _ in samples]), "masks": masks, "valid": valid}
