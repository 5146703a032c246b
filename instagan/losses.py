"""InstaGAN losses as pure functions (paper eq. 3-7), reduced per sample.

Every function returns one value per image, shape (B,), so the training step can give images zero weight (an
image with no instance left in a chunk) and apply the loss weights in one place. Mask conventions:
`instagan.masks`.
"""

from __future__ import annotations

from torch import Tensor


def lsgan(pred: Tensor, target: float) -> Tensor:
    """Least-squares GAN loss: mean over patches of (pred - target)^2. (B, 1, h, w) -> (B,).

    D minimises lsgan(D(real), 1) + lsgan(D(fake), 0) (times 0.5); G minimises lsgan(D(fake), 1).
    """
    return (pred.float() - target).pow(2).flatten(1).mean(1)


def masked_l1(img: Tensor, masks: Tensor, valid: Tensor, img_ref: Tensor, masks_ref: Tensor,
              img_weight: Tensor | None = None) -> Tensor:
    """L1 between (img, masks) and (img_ref, masks_ref), averaged over the channels of [img; masks] as the
    authors' code does on the concatenated tensor; padding slots contribute 0 whatever their values.

    (B, 3, H, W), (B, N, H, W), (B, N), (B, 3, H, W), (B, N, H, W) -> (B,). Used for the cycle loss
    (rec vs input) and the identity loss (G_ab(b) vs b). img_weight (B, 1, H, W): weights the image's pixels
    (the cycle loss with loss.cyc_free_change), the normalisation stays the same.
    """
    diff = (img.float() - img_ref.float()).abs()
    d_img = (diff if img_weight is None else diff * img_weight.float()).sum(dim=(1, 2, 3))
    d_masks = ((masks.float() - masks_ref.float()).abs().sum(dim=(2, 3)) * valid).sum(1)
    channels = img.shape[1] + masks.shape[1]
    return (d_img + d_masks) / (channels * img.shape[2] * img.shape[3])


def context(x: Tensor, y: Tensor, weight: Tensor) -> Tensor:
    """Context-preserving loss: mean of weight * |x - y| over (C, H, W). (B, C, H, W), (B, 1, H, W) -> (B,).

    `weight` comes from `instagan.masks.context_weight` (1 on background of both original and translated masks).
    """
    return (weight.float() * (x.float() - y.float()).abs()).flatten(1).mean(1)


def weighted_mean(per_sample: Tensor, weight: Tensor) -> Tensor:
    """Mean of per-sample losses over samples with weight 1; 0 when every weight is 0 (the graph stays intact,
    so every data-parallel rank still runs backward). (B,), (B,) -> ()."""
    weight = weight.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp(min=1)
