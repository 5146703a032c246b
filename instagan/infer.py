"""Sequential inference with a trained generator: one direction, no reconstruction work.

    tr = Translator.from_checkpoint("ckpt/", direction="a2b", ins_max=20, ins_per=2)
    out = tr.translate(img, masks, valid)   # img (B, 3, H, W) in [-1, 1], masks (B, N, H, W), valid (B, N)
    out.img, out.masks, out.valid           # translated image; masks in the input's slot order

    # numpy in, numpy out, any image size (what jobs/translate.py and jobs/serve.py use):
    results = tr.translate_arrays([(img_uint8_hw3, masks_bool_khw), ...])   # size=None: at the model's size
    results[0].img, results[0].masks, results[0].translated

The same loop as training without gradients: instances sorted by decreasing area, at most `ins_max` used, chunks
of `ins_per` translated in turn, each on the image produced by the previous chunk, so peak memory depends on
`ins_per` and not on the number of instances. An image with fewer instances than others in the batch keeps its
image once its instances are done, so its result does not depend on the rest of the batch. Slots past `ins_max`
come back invalid (not translated). Used by jobs/translate.py and jobs/serve.py.

The ablation baselines (`model.arch` cyclegan / cyclegan_seg, `instagan.networks.ImageGenerator`) translate in one
step; `Translator.mask_mode` says what their masks mean: "instances" (InstaGAN, one translated mask per input slot),
"union" (CycleGAN+Seg: one translated union mask, (B, 1, H, W)) or "none" (CycleGAN: the input masks come back
unchanged, they are not a prediction).

Image sizes in `translate_arrays`: by default every image is resized to the model's training size
(`config.data.size`, the scale the generator learned), translated, and resized back to its own size (image
bilinear with antialiasing, masks bilinear then thresholded). `size=0` keeps the native resolution instead
(reflection-padded up to a multiple of 4 and cropped back), which costs time quadratic in the image side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import Tensor

from instagan import checkpoint
from instagan import masks as M
from instagan.config import Config
from instagan.networks import build_generator, check_shapes, compile_layers, fast_narrow_convs, setup_device

DIRECTIONS = {"a2b": "G_ab", "b2a": "G_ba"}


@dataclass
class Translation:
    img: Tensor  # (B, 3, H, W) in [-1, 1]
    masks: Tensor  # (B, N, H, W) in [-1, 1], slot n is the translation of input slot n
    valid: Tensor  # (B, N) bool: input slot n was valid and translated (within ins_max)


@dataclass
class ArrayTranslation:
    img: np.ndarray  # uint8 (H, W, 3), the input's size
    masks: np.ndarray  # bool (K', H, W): K' = K for "instances" and "none", 1 for "union"
    translated: np.ndarray  # bool (K',): mask k is a translation (False past ins_max, and for mask_mode "none")


class Translator:
    def __init__(self, generator: torch.nn.Module, ins_max: int = 20, ins_per: int = 2,
                 device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None, compile: bool = False):
        """compile: torch.compile the generator's layer stacks (instagan.networks.compile_layers, static shapes: one
        compile per batch and image shape, the first call of each pays it)."""
        if ins_max < 1 or ins_per < 1:
            raise ValueError(f"ins_max ({ins_max}) and ins_per ({ins_per}) must be >= 1")
        self.device = torch.device(device)
        setup_device(self.device)
        self.G = generator.to(self.device).eval()
        if compile:
            compile_layers(self.G, dynamic=False)
        self.mask_mode: str = getattr(getattr(generator, "module", generator), "mask_mode", "instances")
        self.ins_max, self.ins_per, self.amp_dtype = ins_max, ins_per, amp_dtype
        self.config: Config | None = None  # the training config, when loaded from a checkpoint

    @classmethod
    def from_checkpoint(cls, directory: str, direction: str = "a2b", **kwargs) -> "Translator":
        """Load only the generator of `direction` ("a2b" or "b2a") from a checkpoint directory."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {sorted(DIRECTIONS)}, got {direction!r}")
        cfg, payload = checkpoint.load(directory)
        G = fast_narrow_convs(build_generator(cfg.model))  # the decoders' last conv, faster on CPU (networks)
        G.load_state_dict(payload[DIRECTIONS[direction]])
        tr = cls(G, **kwargs)
        tr.config = cfg
        return tr

    @torch.inference_mode()
    def translate(self, img: Tensor, masks: Tensor, valid: Tensor) -> Translation:
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"img must be (B, 3, H, W), got {tuple(img.shape)}")
        check_shapes(img, masks, valid)
        if img.shape[2] % 4 or img.shape[3] % 4:
            raise ValueError(f"image height and width must be multiples of 4, got {tuple(img.shape[2:])}")
        dev = self.device
        x = img.to(dev, torch.float32)
        sorted_masks, sorted_valid, order = M.sort_by_area(masks.to(dev, torch.float32), valid.to(dev).bool())
        sorted_masks, sorted_valid = M.limit(sorted_masks, sorted_valid, self.ins_max)
        autocast = torch.autocast(dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        if self.mask_mode != "instances":  # a baseline: one step on the union of the (at most ins_max) instances
            with autocast:
                y, bm = self.G(x, *M.as_union(sorted_masks, sorted_valid))
            if self.mask_mode == "union":
                return Translation(y.float(), bm.float(), sorted_valid.any(1, keepdim=True))
            return Translation(y.float(), masks.to(dev, torch.float32), valid.to(dev).bool())
        n_chunks = M.num_chunks(sorted_valid, self.ins_per)
        outs = []
        for m in range(n_chunks):
            cm, cv = M.chunk(sorted_masks, sorted_valid, m, self.ins_per)
            act = cv.any(1)
            if act.all():
                with autocast:
                    y, bm = self.G(x, cm, cv)
                x = y.float()
                outs.append(bm.float())
                continue
            out_m = torch.full_like(cm, -1.0)
            outs.append(out_m)
            if not act.any():  # no instance at all in the batch: nothing to translate
                continue
            # Only images with instances left in this chunk go through G; the others keep their image.
            with autocast:
                y, bm = self.G(x[act], cm[act], cv[act])
            x = x.clone()
            x[act] = y.float()
            out_m[act] = bm.float()
        out_sorted = torch.cat(outs, 1)[:, :sorted_valid.shape[1]]
        # Back to the input slot order: sorted slot j came from input slot order[:, j].
        n = masks.shape[1]
        out_masks = torch.full((img.shape[0], n, *img.shape[2:]), -1.0, device=dev)
        out_valid = torch.zeros(img.shape[0], n, dtype=torch.bool, device=dev)
        k = out_sorted.shape[1]
        idx = order[:, :k]
        out_masks.scatter_(1, idx[:, :, None, None].expand(-1, -1, *img.shape[2:]), out_sorted)
        out_valid.scatter_(1, idx, sorted_valid)
        return Translation(x, out_masks, out_valid)

    # ---- numpy in, numpy out, any size ---------------------------------------------------------------------------

    @staticmethod
    def check_item(img: np.ndarray, masks: np.ndarray) -> None:
        """Raise ValueError with the reason when (img, masks) is not uint8 (H, W, 3) with bool (K, H, W) masks."""
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image must be a uint8 array (H, W, 3), got "
                             f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}")
        if min(img.shape[:2]) < 4:
            raise ValueError(f"image is too small: {img.shape[0]}x{img.shape[1]} (at least 4x4)")
        if not isinstance(masks, np.ndarray) or masks.ndim != 3:
            raise ValueError(f"masks must be an array (K, H, W), got {getattr(masks, 'shape', type(masks).__name__)}")
        if masks.shape[1:] != img.shape[:2]:
            raise ValueError(f"masks are {masks.shape[1]}x{masks.shape[2]} but the image is "
                             f"{img.shape[0]}x{img.shape[1]}")

    def translate_arrays(self, items: list[tuple[np.ndarray, np.ndarray]], size: int | None = None,
                         batch_size: int = 8) -> list[ArrayTranslation]:
        """Translate images of any size: items of (img uint8 (H, W, 3), masks bool (K, H, W)), K >= 0.

        size: None = the model's training size (config.data.size), 0 = native size (see the module docstring).
        Items are translated in batches of up to `batch_size` images of the same working size; results come back in
        input order at each input's own size. Raises ValueError naming the item for a bad one (see `check_item`).
        """
        for i, (img, masks) in enumerate(items):
            try:
                self.check_item(img, masks)
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
        if size is None:
            if self.config is None:
                raise ValueError("size=None needs the training config (load with from_checkpoint) or an explicit size")
            size = self.config.data.size
        if size < 0 or size % 4:
            raise ValueError(f"size must be 0 (native) or a positive multiple of 4, got {size}")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (img, _) in enumerate(items):
            groups.setdefault((size, size) if size else _padded(img.shape[:2]), []).append(i)
        results: list[ArrayTranslation | None] = [None] * len(items)
        for shape, idx in groups.items():
            for start in range(0, len(idx), batch_size):
                part = idx[start:start + batch_size]
                for i, res in zip(part, self._translate_group([items[i] for i in part], shape, native=not size)):
                    results[i] = res
        return results  # type: ignore[return-value]

    def translate_each(self, items: list[tuple[np.ndarray, np.ndarray]], size: int | None = None,
                       batch_size: int = 8) -> list[ArrayTranslation | Exception]:
        """translate_arrays, but an item that fails does not fail the others: if the batched call raises, each
        item is translated alone and a failing item's exception is returned as its result."""
        try:
            return list(self.translate_arrays(items, size=size, batch_size=batch_size))
        except Exception as e:
            if len(items) == 1:
                return [e]
        out: list[ArrayTranslation | Exception] = []
        for item in items:
            try:
                out.append(self.translate_arrays([item], size=size, batch_size=1)[0])
            except Exception as e:
                out.append(e)
        return out

    def _translate_group(self, items: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int],
                         native: bool) -> list[ArrayTranslation]:
        samples = []
        for img, masks in items:  # one channel group at a time: at most the image and one mask at full size in float
            x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(127.5).sub(1)
            m = [_to_shape(torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None].float().mul(2).sub(1),
                           shape, native) for mask in masks]
            samples.append((_to_shape(x, shape, native), torch.cat(m) if m else torch.zeros(0, *shape)))
        # Padded in input slot order (M.collate would sort by area, and results map back by slot).
        masks_b, valid_b = M.pad_sets([m for _, m in samples])
        out = self.translate(torch.stack([x for x, _ in samples]), masks_b, valid_b)
        results = []
        for j, (img, masks) in enumerate(items):
            h, w = img.shape[:2]
            k = len(masks)
            if self.mask_mode == "none":
                y = _from_shape(out.img[j].cpu(), (h, w), native)
                out_masks, translated = np.asarray(masks, dtype=bool), np.zeros(k, dtype=bool)
            else:
                kk = k if self.mask_mode == "instances" else 1
                y = _from_shape(out.img[j].cpu(), (h, w), native)
                out_masks = np.zeros((kk, h, w), dtype=bool)  # compact: each mask resized back and thresholded alone
                for n in range(kk):
                    out_masks[n] = (_from_shape(out.masks[j, n:n + 1].cpu(), (h, w), native)[0] > 0).numpy()
                translated = out.valid[j, :kk].cpu().numpy().copy()
                if self.mask_mode == "instances":  # untranslated slots (past ins_max) keep their input mask
                    out_masks[~translated] = np.asarray(masks, dtype=bool)[~translated]
            pixels = y.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            results.append(ArrayTranslation(pixels, out_masks, translated))
        return results


def _padded(hw: tuple[int, ...]) -> tuple[int, int]:
    return -(-hw[0] // 4) * 4, -(-hw[1] // 4) * 4


def _to_shape(t: Tensor, shape: tuple[int, int], native: bool) -> Tensor:
    """(C, H, W) -> (C, *shape): reflection padding at the bottom/right (native) or a bilinear resize."""
    if native:
        ph, pw = shape[0] - t.shape[1], shape[1] - t.shape[2]
        return Fn.pad(t[None], (0, pw, 0, ph), mode="reflect")[0] if ph or pw else t
    if tuple(t.shape[1:]) == shape:
        return t
    return Fn.interpolate(t[None], size=shape, mode="bilinear", antialias=True, align_corners=False)[0]


def _from_shape(t: Tensor, hw: tuple[int, int], native: bool) -> Tensor:
    """Undo `_to_shape`: crop the padding, or resize back to (H, W)."""
    if native or tuple(t.shape[1:]) == hw:
        return t[:, :hw[0], :hw[1]]
    return Fn.interpolate(t[None], size=hw, mode="bilinear", antialias=True, align_corners=False)[0]
