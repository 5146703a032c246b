"""InstaGAN's set-aware generator and discriminator (Mo, Cho, Shin, ICLR 2019; DESIGN.md section 2).

    G = SetGenerator()                       # ngf 64, 9 residual blocks: 26,815,108 parameters
    img_out, masks_out = G(img, masks, valid)
    D = SetDiscriminator()                   # ndf 64, spectral norm on every conv: 9,721,729 parameters
    scores = D(img, masks, valid)            # (B, 1, h, w) PatchGAN scores

Mask conventions are in `instagan.masks` (masks in [-1, 1], `valid` marks real instances). Unlike the authors'
code, which sums the set feature over the whole batch (so it only works at batch size 1) and loops over
instances in Python, all valid instances of the batch go through the mask networks in one call and each image's
set feature is the sum over its own instances only (`index_add_`). Instance norm is per sample, so an instance's
features never depend on other instances or other images.

Every parameter takes part in every forward, even when a batch holds no instance at all (one empty mask is then
encoded with weight 0): data-parallel training needs no `find_unused_parameters`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint

from instagan.memory import ReflectionPad2d, lean_on


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(module, "module", module)


def _init_weights(module: nn.Module) -> None:
    """N(0, 0.02) weights and zero biases for every conv (the authors' 'normal' init)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)


def _conv_in_relu(cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, pad), nn.InstanceNorm2d(cout), nn.ReLU(inplace=True)]


class ResnetBlock(nn.Module):
    """x + [pad, conv 3x3, IN, ReLU, pad, conv 3x3, IN](x) with reflection padding."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            ReflectionPad2d(1), *_conv_in_relu(dim, dim, 3),
            ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _encoder(cin: int, ngf: int, n_blocks: int) -> nn.Sequential:
    """(B, cin, H, W) -> (B, 4 ngf, H/4, W/4)."""
    layers = [ReflectionPad2d(3), *_conv_in_relu(cin, ngf, 7)]
    layers += _conv_in_relu(ngf, 2 * ngf, 3, stride=2, pad=1) + _conv_in_relu(2 * ngf, 4 * ngf, 3, stride=2, pad=1)
    layers += [ResnetBlock(4 * ngf) for _ in range(n_blocks)]
    return nn.Sequential(*layers)


@functools.cache
def _s2d_index(cout: int, cin: int, k: int, r: int) -> tuple[Tensor, int]:
    """Where each weight of NarrowConv2d's space-to-depth conv comes from: flat indices into [weight.flatten(); 0]
    of shape (cout r^2, cin r^2, q, q), and q = ceil((k + r - 1) / r), its kernel size. Built outside inference
    mode (cached, and a Translator may ask first), so training can save it for backward."""
    with torch.inference_mode(False):
        return _s2d_index_of(cout, cin, k, r)


def _s2d_index_of(cout: int, cin: int, k: int, r: int) -> tuple[Tensor, int]:
    q = -(-(k + r - 1) // r)
    o, dy, dx, c, py, px, qy, qx = torch.meshgrid(*[torch.arange(n) for n in (cout, r, r, cin, r, r, q, q)],
                                                   indexing="ij")
    ky, kx = r * qy + py - dy, r * qx + px - dx  # the output pixel (r I + dy) reads input row r (I + qy) + py
    inside = (ky >= 0) & (ky < k) & (kx >= 0) & (kx < k)
    flat = ((o * cin + c) * k + ky.clamp(0, k - 1)) * k + kx.clamp(0, k - 1)
    return torch.where(inside, flat, cout * cin * k * k).reshape(cout * r * r, cin * r * r, q, q), q


class NarrowConv2d(nn.Conv2d):
    """nn.Conv2d (stride 1, no padding) for a few output channels, the decoders' last 7x7 conv: the same
    parameters and numbers (to rounding), faster on CPU. oneDNN vectorises a conv over its output channels and runs
    one with 1 or 3 of them at a tenth of its usual FLOP/s (ngf 16, 64 px: a third of a training step). On CPU
    this computes it space-to-depth: the input pixel-unshuffled by r (r^2 times the channels), a conv of
    ceil((k + r - 1) / r) taps with cout r^2 output channels whose weights are gathered from this one's (zeros
    where no tap maps), and the result pixel-shuffled back. r: the smallest with cout r^2 >= 12. Only where
    `space_to_depth` is set, and not inside lean_saved_tensors() (which keeps the padded input as its unpadded
    source, where this would keep its own copy)."""

    space_to_depth = False  # off: exactly nn.Conv2d (set per module by `fast_narrow_convs`)

    def forward(self, x: Tensor) -> Tensor:
        cout, cin, k, _ = self.weight.shape
        if not self.space_to_depth or x.device.type != "cpu" or lean_on() or self.stride != (1, 1) \
                or self.padding != (0, 0) or self.groups != 1 or k != self.weight.shape[3] or cout > 4:
            return super().forward(x)
        r = 4 if cout == 1 else 2
        index, q = _s2d_index(cout, cin, k, r)
        h, w = x.shape[-2] - k + 1, x.shape[-1] - k + 1
        if h % r or w % r:
            return super().forward(x)
        x = F.pad(x, (0, (w // r + q - 1) * r - x.shape[-1], 0, (h // r + q - 1) * r - x.shape[-2]))
        weight = torch.cat([self.weight.flatten(), self.weight.new_zeros(1)])[index]
        bias = None if self.bias is None else self.bias.repeat_interleave(r * r)
        y = self._conv_forward(F.pixel_unshuffle(x, r), weight, bias)
        return F.pixel_shuffle(y, r)


def fast_narrow_convs(module: nn.Module, on: bool = True) -> nn.Module:
    """Turn NarrowConv2d's space-to-depth CPU path on (or off) in every NarrowConv2d of `module`."""
    for m in module.modules():
        if isinstance(m, NarrowConv2d):
            m.space_to_depth = on
    return module


UPSAMPLE = ("deconv", "resize")  # ModelConfig.upsample
PAINT = ("direct", "residual", "gated", "extend")  # ModelConfig.paint


def _up(cin: int, cout: int, upsample: str) -> nn.Module:
    """x2 upsampling: the authors' transposed conv 3x3 stride 2, or nearest resize + conv 3x3 (no checkerboard;
    the same number of weights)."""
    if upsample == "deconv":
        return nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
    if upsample == "resize":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), ReflectionPad2d(1), nn.Conv2d(cin, cout, 3))
    raise ValueError(f"unknown upsample {upsample!r}, expected one of {UPSAMPLE}")


def _decoder(cin: int, cout: int, upsample: str = "deconv") -> nn.Sequential:
    """(B, cin, h, w) -> (B, cout, 4h, 4w) in [-1, 1]: two x2 upsamplings halving width, conv 7x7, tanh."""
    layers: list[nn.Module] = []
    for c in (cin, cin // 2):
        layers += [_up(c, c // 2, upsample), nn.InstanceNorm2d(c // 2), nn.ReLU(inplace=True)]
    layers += [ReflectionPad2d(3), NarrowConv2d(cin // 4, cout, 7), nn.Tanh()]
    return nn.Sequential(*layers)


class CondDecoder(nn.Module):
    """The image decoder told where the instances are and will be: `cond` (B, k, H, W) maps (e.g. the union of
    the input masks and of the translated masks) are concatenated, resized, to the input of each of its three
    stages. (B, cin, h, w), (B, k, 4h, 4w) -> (B, cout, 4h, 4w) in [-1, 1]."""

    def __init__(self, cin: int, cout: int, k: int, upsample: str = "deconv"):
        super().__init__()
        self.up1 = nn.Sequential(_up(cin + k, cin // 2, upsample), nn.InstanceNorm2d(cin // 2), nn.ReLU(inplace=True))
        self.up2 = nn.Sequential(_up(cin // 2 + k, cin // 4, upsample), nn.InstanceNorm2d(cin // 4),
                                 nn.ReLU(inplace=True))
        self.out = nn.Sequential(ReflectionPad2d(3), NarrowConv2d(cin // 4 + k, cout, 7), nn.Tanh())

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        cond = cond.to(x.dtype)
        for stage, scale in ((self.up1, 4), (self.up2, 2)):
            x = stage(torch.cat([x, nn.functional.avg_pool2d(cond, scale)], 1))
        return self.out(torch.cat([x, cond], 1))


def paint_weight(masks: Tensor, valid: Tensor) -> Tensor:
    """Where a composite takes the generator's pixels: clamp(sum over valid instances of relu(mask), 0, 1).
    Exactly 0 wherever every mask is <= 0 (background, as the metrics count it), 1 inside a confident instance,
    soft at uncertain edges. (B, N, H, W), (B, N) -> (B, 1, H, W) fp32."""
    fg = masks.float().clamp(min=0) * valid[:, :, None, None].float()
    return fg.sum(dim=1, keepdim=True).clamp(max=1)


def extend_colours(img: Tensor, masks: Tensor, valid: Tensor, out_masks: Tensor, vacate: bool = False) -> Tensor:
    """The input with each instance grown into its translated shape in its own mean colour: where the translated
    masks cover a pixel no input mask covers, the colour is the mean input colour of the instances covering it
    (weighted by their translated masks); every other pixel is the input's. (B, 3, H, W), (B, N, H, W) x2, (B, N)
    -> (B, 3, H, W) fp32. The base that paint "extend" changes: an object keeps its colour where its shape grows.
    vacate: also where an input instance lies and no translated one does (the area a shrinking object leaves),
    the base is the local background (`background_fill`) instead of the object."""
    v = valid[:, :, None, None].float()
    w_in = masks.float().clamp(min=0) * v
    w_out = out_masks.float().clamp(min=0) * v
    x = img.float()
    colour = torch.einsum("bchw,bnhw->bnc", x, w_in) / w_in.flatten(2).sum(-1).clamp(min=1e-6)[..., None]
    cover = w_out.sum(1, keepdim=True)
    fill = torch.einsum("bnc,bnhw->bchw", colour, w_out) / cover.clamp(min=1e-6)
    inside = w_in.sum(1, keepdim=True).clamp(max=1)
    added = (cover.clamp(max=1) - inside).clamp(min=0)
    out = x * (1 - added) + fill * added
    if vacate:
        left = (inside - cover.clamp(max=1)).clamp(min=0)
        out = out * (1 - left) + background_fill(x, 1 - inside) * left
    return out


def layer_colours(img: Tensor, masks: Tensor, valid: Tensor, out_masks: Tensor, priority: Tensor,
                  vacate: bool = False) -> Tensor:
    """`extend_colours` with the translated objects as layers: every pixel a translated mask (> 0) covers has one
    owner, the covering instance of the highest `priority` (the translated masks' own values), instead of a blend of
    the covering instances' colours; its base is the input pixel where it lies inside the owner's input mask away
    from its rim (the mask eroded by one pixel: edge pixels mix the object with its old surroundings), else the
    owner's mean input colour (over that eroded mask). Pixels no translated mask covers are the input's (or, with
    vacate, the local background where an input instance lies). (B, 3, H, W), (B, N, H, W) x3, (B, N) ->
    (B, 3, H, W) fp32, no gradient to the masks."""
    with torch.no_grad():
        v = valid[:, :, None, None]
        x = img.float()
        inside_n = ((masks > 0) & v).float()
        interior = -F.max_pool2d(-inside_n, 3, 1, 1)  # eroded by one pixel (8-neighbours)
        w = torch.where(interior.flatten(2).sum(-1, keepdim=True)[..., None] > 0, interior, inside_n)
        colour = torch.einsum("bchw,bnhw->bnc", x, w) / w.flatten(2).sum(-1).clamp(min=1e-6)[..., None]
        cover = (out_masks > 0) & v
        rank = torch.where(cover, priority.float(), float("-inf"))
        owner = F.one_hot(rank.argmax(1), masks.shape[1]).permute(0, 3, 1, 2).float() * cover.any(1, keepdim=True)
        fill = torch.einsum("bnc,bnhw->bchw", colour, owner)
        keep_x = (owner * interior).sum(1, keepdim=True)
        covered = owner.sum(1, keepdim=True)
        out = x * (1 - covered) + covered * (keep_x * x + (1 - keep_x) * fill)
        if vacate:
            left = (inside_n.sum(1, keepdim=True).clamp(max=1) - covered).clamp(min=0)
            out = out * (1 - left) + background_fill(x, 1 - inside_n.sum(1, keepdim=True).clamp(max=1)) * left
        return out


def connected_part(masks: Tensor, out_masks: Tensor) -> Tensor:
    """Each translated mask (> 0) kept only where it is connected, through its own pixels (8-neighbours), to its
    input instance's pixels (> 0); elsewhere -1. A translated mask that does not touch its input instance is kept
    whole (nothing to anchor it). (B, N, H, W) x2 -> (B, N, H, W) in out_masks' dtype, no gradient."""
    with torch.no_grad():
        inside = (out_masks > 0).float()
        reach = inside * (masks > 0).float()
        for _ in range(max(out_masks.shape[-2:])):  # a path inside an H x W mask is at most H x W long; this many
            reach = F.max_pool2d(reach, 3, 1, 1) * inside  # steps covers masks that are not spirals
        anchored = reach.flatten(2).amax(-1)[..., None, None] > 0
        keep = torch.where(anchored, reach > 0, inside > 0)
        return torch.where(keep, out_masks, torch.full_like(out_masks, -1.0))


def background_fill(x: Tensor, bg: Tensor, sizes: tuple[int, ...] = (9, 17, 33)) -> Tensor:
    """The local background colour at every pixel: the mean of x over the background pixels (weight `bg`, (B, 1,
    H, W) in [0, 1]) of a k x k window, for the smallest k of `sizes` whose window holds any, else the image's
    background mean (else its mean). (B, 3, H, W) fp32, no gradient to x's objects."""
    x, bg = x.float(), bg.float()
    out = torch.zeros_like(x)
    todo = torch.ones_like(bg)
    for k in sizes:
        num = F.avg_pool2d(x * bg, k, 1, k // 2, count_include_pad=False)
        den = F.avg_pool2d(bg, k, 1, k // 2, count_include_pad=False)
        have = (den > 1e-3).float() * todo
        out = out + have * num / den.clamp(min=1e-3)
        todo = todo - have
    total = bg.sum((2, 3), keepdim=True)
    mean = torch.where(total > 0, (x * bg).sum((2, 3), keepdim=True) / total.clamp(min=1e-6),
                       x.mean((2, 3), keepdim=True))
    return out + todo * mean


def check_shapes(img: Tensor, masks: Tensor, valid: Tensor) -> None:
    """Raise ValueError naming both shapes unless masks are (B, N, H, W) and valid (B, N) for img (B, C, H, W)."""
    if masks.ndim != 4 or masks.shape[:1] + masks.shape[2:] != img.shape[:1] + img.shape[2:] \
            or tuple(valid.shape) != tuple(masks.shape[:2]):
        raise ValueError(f"masks {tuple(masks.shape)} and valid {tuple(valid.shape)} do not match the image "
                         f"{tuple(img.shape)}: expected (B, N, H, W) and (B, N)")


def _gather_instances(masks: Tensor, valid: Tensor, static: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's valid masks as one batch (M, 1, H, W), the image each belongs to (M,), and a weight (M,).

    With no valid instance at all, one empty mask of image 0 with weight 0 keeps every parameter in the graph.
    static: every slot instead, padding with weight 0 (M = B N): shapes that do not depend on `valid` and no host
    sync, for compiled networks; the valid slots' features are the same (instance norm is per mask).
    """
    if static:
        b, n, h, w = masks.shape
        owner = torch.arange(b, device=masks.device).repeat_interleave(n)
        return masks.reshape(b * n, 1, h, w), owner, valid.flatten().to(masks.dtype)
    owner = valid.nonzero()[:, 0]
    sel = masks[valid].unsqueeze(1)
    weight = torch.ones(len(owner), device=masks.device, dtype=masks.dtype)
    if len(owner) == 0:
        b, _, h, w = masks.shape
        sel = masks.new_full((1, 1, h, w), -1.0)
        owner = torch.zeros(1, dtype=torch.long, device=masks.device)
        weight = torch.zeros(1, device=masks.device, dtype=masks.dtype)
    return sel, owner, weight


def _set_sum(feats: Tensor, owner: Tensor, weight: Tensor, batch: int) -> Tensor:
    """Sum instance features per owning image: (M, C, h, w) -> (B, C, h, w). Permutation invariant.
    Sums in at least fp32 (features may be bf16 under autocast)."""
    out = feats.new_zeros((batch, *feats.shape[1:]), dtype=torch.promote_types(feats.dtype, torch.float32))
    return out.index_add(0, owner, feats.to(out.dtype) * weight.to(out.dtype)[:, None, None, None])


class SetGenerator(nn.Module):
    """InstaGAN generator: translates an image and the set of its instance masks.

    img (B, 3, H, W) in [-1, 1], masks (B, N, H, W), valid (B, N) -> img_out (B, 3, H, W), masks_out (B, N, H, W).
    H and W must be multiples of 4. img_out is invariant and masks_out equivariant to the order of instances;
    padding slots come out as -1 (empty).

    Options beyond the paper (all off by default; ModelConfig documents what each did in our measurements):
    - composite: img_out = img * (1 - u) + g * u with u = `paint_weight` of the input and translated masks (the
      authors' "cut, translate, paste back"): pixels outside every instance are the input's exactly, and the
      generator only paints the objects and the area they vacate.
    - mask_cond: the image decoder also sees the union of the input masks and of the translated masks
      (`CondDecoder`), so the image can follow the new shapes.
    - paint: how the image decoder's output d (tanh) becomes the painted image g. "direct" (the paper): g = d.
      "residual": g = clamp(img + 2 d, -1, 1), a change of the input: a pixel that should stay needs d = 0
      (where tanh has its largest gradient), so objects keep their colours where their shape does not change.
      "gated": d has a fourth channel, a gate a in [0, 1], and g = a * img + (1 - a) * d (attention-guided
      painting as in GANimation); measured to collapse to a = 1, copying the input everywhere (README "Quality").
      "extend": residual around `extend_colours` (detached translated masks) instead of the input: where a shape
      grows, the change starts from the object's own mean colour, not from the background.
    - sharp: composite, mask_cond and "extend" see the translated masks thresholded at 0 (+1 inside, -1 outside)
      instead of their soft values, so a corner the mask adds is painted fully, not in proportion to a mask of 0.3.
    - vacate (with "extend"): where an object leaves a pixel (input mask, no translated mask), the base is the local
      background colour (`background_fill`) instead of the object's, so shrinking starts from the background.
    - layers (with "extend"): the base paints the translated objects as layers (`layer_colours`): one owner per
      pixel where translated masks overlap, and an object's anti-aliased input rim repainted in its colour.
    - connected: the image follows each translated mask only where it connects to its input instance
      (`connected_part`): stray fragments of a mask away from its object are not painted.
    - paint_init "zero": the image decoder's last conv starts at zero, so with "residual" or "extend" the first
      painted image is the input (or its objects grown into the translated masks), with no noise to unlearn.
    - upsample: "deconv" (the authors' transposed convs) or "resize" (nearest x2 + conv).
    """

    mask_mode = "instances"  # one translated mask per input slot (ImageGenerator: "none" or "union")
    static_sets = False  # encode every mask slot, padding with weight 0 (_gather_instances; set by `compile_layers`)

    def __init__(self, ngf: int = 64, n_blocks: int = 9, img_channels: int = 3, composite: bool = False,
                 mask_cond: bool = False, upsample: str = "deconv", paint: str = "direct", sharp: bool = False,
                 paint_init: str = "normal", vacate: bool = False, connected: bool = False, layers: bool = False):
        super().__init__()
        if paint not in PAINT:
            raise ValueError(f"unknown paint {paint!r}, expected one of {PAINT}")
        if paint_init not in ("normal", "zero") or (paint_init == "zero" and paint not in ("residual", "extend")):
            raise ValueError(f"paint_init must be 'normal', or 'zero' with paint 'residual' or 'extend'; got "
                             f"{paint_init!r} with {paint!r}")
        if (vacate or layers) and paint != "extend":
            raise ValueError(f"vacate and layers need paint 'extend', got {paint!r}")
        self.composite, self.mask_cond, self.paint, self.sharp = composite, mask_cond, paint, sharp
        self.vacate, self.connected, self.layers = vacate, connected, layers
        self.enc_img = _encoder(img_channels, ngf, n_blocks)  # f_GX
        self.enc_mask = _encoder(1, ngf, n_blocks)  # f_GA, shared by all instances
        # g_GX on [f_GX(x); s] (+ one gate channel)
        cout = img_channels + (paint == "gated")
        self.dec_img = (CondDecoder(8 * ngf, cout, 2, upsample) if mask_cond else _decoder(8 * ngf, cout, upsample))
        self.dec_mask = _decoder(12 * ngf, 1, upsample)  # g_GA on [f_GA(a_n); f_GX(x); s]
        _init_weights(self)
        if paint_init == "zero":  # the first change is none: the image starts as the input (or its grown objects)
            last = [m for m in self.dec_img.modules() if isinstance(m, nn.Conv2d)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, img: Tensor, masks: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        check_shapes(img, masks, valid)
        b = img.shape[0]
        feat_img = self.enc_img(img)
        sel, owner, weight = _gather_instances(masks, valid, self.static_sets)
        feat_ins = self.enc_mask(sel)
        feat_set = _set_sum(feat_ins, owner, weight, b)
        dec = self.dec_mask(torch.cat([feat_ins, feat_img[owner], feat_set[owner]], 1))
        if self.static_sets:
            masks_out = torch.where(valid[:, :, None, None], dec.view(masks.shape), -1.0).to(dec.dtype)
        else:
            masks_out = torch.full_like(masks, -1.0, dtype=dec.dtype)
            if valid.any():
                masks_out = masks_out.masked_scatter(valid[:, :, None, None].expand_as(masks_out), dec)
        feat = torch.cat([feat_img, feat_set], 1)
        # what the image follows: the translated masks, detached (image losses must not move them through it; they
        # learn to grow over whatever the generator paints, measured), thresholded with `sharp`
        follow = masks_out.detach()
        if self.sharp:
            follow = torch.where(follow > 0, 1.0, -1.0).to(follow.dtype)
        if self.connected:
            follow = connected_part(masks, follow)
        if self.mask_cond:
            cond = torch.cat([paint_weight(masks, valid), paint_weight(follow, valid)], 1)
            img_out = self.dec_img(feat, cond)
        else:
            img_out = self.dec_img(feat)
        if not self.static_sets and not valid.any():
            img_out = img_out + 0.0 * dec.sum()  # keeps the mask decoder in the graph (see module docstring)
        if self.paint == "residual":
            img_out = (img.float() + 2 * img_out.float()).clamp(-1, 1)  # images stay in [-1, 1]
        elif self.paint == "extend":
            base = (layer_colours(img, masks, valid, follow, masks_out.detach(), self.vacate) if self.layers
                    else extend_colours(img, masks, valid, follow, self.vacate))
            img_out = (base + 2 * img_out.float()).clamp(-1, 1)
        elif self.paint == "gated":
            keep = (img_out[:, -1:].float() + 1) / 2  # tanh -> [0, 1]
            img_out = keep * img.float() + (1 - keep) * img_out[:, :-1].float()
        if self.composite:
            u = paint_weight(torch.cat([masks, follow], 1), torch.cat([valid, valid], 1))
            img_out = img.float() * (1 - u) + img_out.float() * u
        return img_out, masks_out


def _sn_conv(cin: int, cout: int, stride: int) -> nn.Module:
    """Conv 4x4 with padding 1, N(0, 0.02) init, then spectral norm (so its power iteration starts from the
    initialised weight)."""
    conv = nn.Conv2d(cin, cout, 4, stride, 1)
    _init_weights(conv)
    return spectral_norm(conv)


def _feature_extractor(cin: int, ndf: int) -> nn.Sequential:
    """(B, cin, H, W) -> (B, 4 ndf, H/8, W/8): three spectral-norm convs 4x4 stride 2, IN on the last two."""
    return nn.Sequential(
        _sn_conv(cin, ndf, 2), nn.LeakyReLU(0.2, inplace=True),
        _sn_conv(ndf, 2 * ndf, 2), nn.InstanceNorm2d(2 * ndf), nn.LeakyReLU(0.2, inplace=True),
        _sn_conv(2 * ndf, 4 * ndf, 2), nn.InstanceNorm2d(4 * ndf), nn.LeakyReLU(0.2, inplace=True),
    )


class SetDiscriminator(nn.Module):
    """InstaGAN discriminator: PatchGAN 70x70 over [f_DX(x); sum_i f_DA(a_i)], spectral norm on every conv.

    img (B, 3, H, W), masks (B, N, H, W), valid (B, N) -> (B, 1, H/8 - 2, W/8 - 2) least-squares scores (2
    channels with img_head). Invariant to the order of instances. `set_feature` and `classify` split the forward so a
    caller can add the features of masks it holds fixed (computed once without gradients) to those of new masks:
    D(x, a1 + a2) == D.classify(x, D.set_feature(a1) + D.set_feature(a2)).

    Options beyond the paper (off by default), so that D cannot be satisfied by the masks alone:
    - inst_img: the instance branch sees each mask together with the image inside it ([a_i; x * a_i], 4
      channels), so a mask of the right shape over pixels of the wrong shape does not pass. `set_feature` then
      needs the image.
    - img_head: a second PatchGAN head on the image features alone; the scores are then (B, 2, h, w), the joint
      head's and the image head's, and the least-squares losses average over both.
    - mask_head: a PatchGAN of its own on each mask alone (`mask_scores`: each image's mean over its instances),
      appended as one more score channel: a shape judged per instance, not diluted in the set's sum.
    """

    def __init__(self, ndf: int = 64, img_channels: int = 3, inst_img: bool = False, img_head: bool = False,
                 mask_head: bool = False):
        super().__init__()
        self.inst_img = inst_img
        self.feat_img = _feature_extractor(img_channels, ndf)  # f_DX
        self.feat_mask = _feature_extractor(1 + img_channels * inst_img, ndf)  # f_DA
        self.classifier = nn.Sequential(
            _sn_conv(8 * ndf, 16 * ndf, 1), nn.InstanceNorm2d(16 * ndf), nn.LeakyReLU(0.2, inplace=True),
            _sn_conv(16 * ndf, 1, 1),
        )
        self.img_head = nn.Sequential(
            _sn_conv(4 * ndf, 8 * ndf, 1), nn.InstanceNorm2d(8 * ndf), nn.LeakyReLU(0.2, inplace=True),
            _sn_conv(8 * ndf, 1, 1),
        ) if img_head else None
        self.mask_head = nn.Sequential(
            *_feature_extractor(1, ndf),
            _sn_conv(4 * ndf, 8 * ndf, 1), nn.InstanceNorm2d(8 * ndf), nn.LeakyReLU(0.2, inplace=True),
            _sn_conv(8 * ndf, 1, 1),
        ) if mask_head else None

    def _instances(self, masks: Tensor, valid: Tensor, img: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        sel, owner, weight = _gather_instances(masks, valid)
        if self.inst_img:
            if img is None:
                raise ValueError("this discriminator's instance branch sees the image (inst_img): pass img")
            sel = torch.cat([sel.to(img.dtype), img[owner] * ((sel.to(img.dtype) + 1) / 2)], 1)
        return sel, owner, weight

    def set_feature(self, masks: Tensor, valid: Tensor, group: int = 0, img: Tensor | None = None) -> Tensor:
        """Sum of f_DA over each image's valid instances: (B, N, H, W), (B, N) -> (B, 4 ndf, H/8, W/8).

        group > 0: with gradients on and more than `group` instances in the batch, features are computed in
        checkpointed groups of `group` masks (recomputed in backward), so activation memory is bounded by the
        group and does not grow with the number of instances. Run forward and backward inside
        `torch.nn.utils.parametrize.cached()` so the recomputation sees the same spectral-norm weights.
        img (B, 3, H, W): the image the masks belong to, needed (only) when inst_img is on.
        """
        sel, owner, weight = self._instances(masks, valid, img)
        if group <= 0 or len(sel) <= group or not torch.is_grad_enabled():
            return _set_sum(self.feat_mask(sel), owner, weight, masks.shape[0])
        if not parametrize._cache_enabled:
            raise RuntimeError("set_feature with group > 0 must run inside torch.nn.utils.parametrize.cached()")
        for conv in self.feat_mask:  # compute (and cache) the spectral-norm weights outside the checkpoints
            if parametrize.is_parametrized(conv):
                conv.weight
        out = 0
        for i in range(0, len(sel), group):
            feats = checkpoint(self.feat_mask, sel[i:i + group], use_reentrant=False)
            out = out + _set_sum(feats, owner[i:i + group], weight[i:i + group], masks.shape[0])
        return out

    def classify(self, img: Tensor, feat_set: Tensor) -> Tensor:
        feat = self.feat_img(img)
        joint = self.classifier(torch.cat([feat, feat_set], 1))
        return joint if self.img_head is None else torch.cat([joint, self.img_head(feat)], 1)

    def mask_scores(self, masks: Tensor, valid: Tensor) -> Tensor:
        """The mask head's scores of each valid mask alone, averaged over each image's instances (0 for an image
        without one): (B, N, H, W), (B, N) -> (B, 1, h, w), the size of the other heads' scores."""
        sel, owner, weight = _gather_instances(masks, valid)
        count = valid.sum(1).clamp(min=1).to(torch.float32)[:, None, None, None]
        return _set_sum(self.mask_head(sel), owner, weight, masks.shape[0]) / count

    def forward(self, img: Tensor, masks: Tensor, valid: Tensor, group: int = 0) -> Tensor:
        scores = self.classify(img, self.set_feature(masks, valid, group, img))
        if self.mask_head is None:
            return scores
        return torch.cat([scores, self.mask_scores(masks, valid).to(scores.dtype)], 1)


class ImageGenerator(nn.Module):
    """The paper's ablation baselines (fig. 9): a CycleGAN ResNet generator (the same encoder and decoder layers,
    one image path, no set feature).

    seg=False (CycleGAN): img (B, 3, H, W) -> img_out; masks and valid come back unchanged (not a prediction).
    seg=True (CycleGAN+Seg): the image and ONE union mask are translated jointly: masks (B, 1, H, W) with valid
    (B, 1) (see `instagan.masks.as_union`) -> img_out, translated union (B, 1, H, W) (-1 where valid is False).
    `mask_mode` tells callers which ("none" or "union"; SetGenerator's is "instances").
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9, seg: bool = False, img_channels: int = 3,
                 upsample: str = "deconv"):
        super().__init__()
        self.seg, self.img_channels = seg, img_channels
        self.mask_mode = "union" if seg else "none"
        self.enc = _encoder(img_channels + seg, ngf, n_blocks)
        self.dec = _decoder(4 * ngf, img_channels + seg, upsample)
        _init_weights(self)

    def forward(self, img: Tensor, masks: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        if not self.seg:
            return self.dec(self.enc(img)), masks
        if masks.shape[1] != 1:
            raise ValueError(f"CycleGAN+Seg translates one union mask per image, got masks {tuple(masks.shape)}")
        out = self.dec(self.enc(torch.cat([img, masks.to(img.dtype)], 1)))
        img_out, mask_out = out[:, :self.img_channels], out[:, self.img_channels:]
        return img_out, torch.where(valid[:, :, None, None], mask_out, torch.full_like(mask_out, -1.0))


class ImageDiscriminator(SetDiscriminator):
    """The CycleGAN baseline's discriminator: SetDiscriminator's layers with the instance branch switched off
    (masks are never looked at; the set feature is the zero-weight empty mask), so it judges the image alone
    with the same capacity as InstaGAN's D."""

    def set_feature(self, masks: Tensor, valid: Tensor, group: int = 0, img: Tensor | None = None) -> Tensor:
        return super().set_feature(masks, torch.zeros_like(valid), 0, img)


class Segmenter(nn.Module):
    """Foreground logits of an image: (B, 3, H, W) in [-1, 1] -> (B, 1, H, W), > 0 where some instance of either
    domain is. The generators' encoder and decoder layers (ngf wide, one residual block) without the final tanh.

    Trained on real images against the union of their masks, it tells the generator step whether the translated
    image shows objects where the translated masks are (`loss.lambda_seg`; a semantic-consistency loss as in
    CyCADA, Hoffman et al. 2018, here at pixel level): supervised, it learns in tens of steps what a
    discriminator's image features took thousands to (README "Quality")."""

    def __init__(self, ngf: int = 16, img_channels: int = 3):
        super().__init__()
        self.net = nn.Sequential(_encoder(img_channels, ngf, 1), *_decoder(4 * ngf, 1)[:-1])
        _init_weights(self)

    def forward(self, img: Tensor) -> Tensor:
        return self.net(img)


ARCHS = ("instagan", "cyclegan", "cyclegan_seg")  # ModelConfig.arch


def build_generator(model) -> nn.Module:
    """G of a `ModelConfig`: InstaGAN's SetGenerator or an ablation baseline's ImageGenerator."""
    if model.arch == "instagan":
        return SetGenerator(model.ngf, model.n_blocks, composite=model.composite, mask_cond=model.mask_cond,
                            upsample=model.upsample, paint=model.paint, sharp=model.sharp,
                            paint_init=model.paint_init, vacate=model.vacate, connected=model.connected,
                            layers=model.layers)
    if model.arch in ("cyclegan", "cyclegan_seg"):
        return ImageGenerator(model.ngf, model.n_blocks, seg=model.arch == "cyclegan_seg", upsample=model.upsample)
    raise ValueError(f"unknown model.arch {model.arch!r}, expected one of {ARCHS}")


def build_discriminator(model) -> nn.Module:
    """D of a `ModelConfig`: the baselines' D sees the image (cyclegan) or the image and the union mask as a
    one-instance set (cyclegan_seg)."""
    if model.arch not in ARCHS:
        raise ValueError(f"unknown model.arch {model.arch!r}, expected one of {ARCHS}")
    if model.arch == "cyclegan":
        return ImageDiscriminator(model.ndf)
    return SetDiscriminator(model.ndf, inst_img=model.d_inst_img, img_head=model.d_img_head,
                            mask_head=model.d_mask)


def compile_layers(module: nn.Module, **options) -> nn.Module:
    """torch.compile, in place, the layer stacks of a SetGenerator (its encoders and decoders; mask sets then
    padded to every slot, `static_sets`, so a chunk of `ins_per` masks per image has one shape) or of another
    network (its direct nn.Sequential children). Parameter names, and so state_dicts, stay as they were.
    Discriminators are left as they are: spectral norm's power iteration writes buffers inside the forward."""
    if isinstance(module, (SetDiscriminator, Segmenter)):
        return module
    if isinstance(module, SetGenerator):
        module.static_sets = True
    for child in module.children():
        if isinstance(child, (nn.Sequential, CondDecoder)):
            child.compile(**options)
    return module


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (spectral-norm u/v vectors are buffers and do not count)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def setup_device(device: torch.device) -> None:
    """Process-wide settings for training or translating on `device`: on CUDA, cuDNN picks the fastest convolution
    algorithm per shape (shapes repeat: chunks are fixed-size) and fp32 matmuls and convolutions run on TF32
    tensor cores."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
