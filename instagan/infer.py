"""Sequential inference with a trained generator: one direction, no reconstruction work.

    tr = Translator.from_checkpoint("ckpt/", direction="a2b", ins_max=20, ins_per=2)
    out = tr.translate(img, masks, valid)   # img (B, 3, H, W) in [-1, 1], masks (B, N, H, W), valid (B, N)
    out.img, out.masks, out.valid           # translated image; masks in the input's slot order

The same loop as training without gradients: instances sorted by decreasing area, at most `ins_max` used, chunks
of `ins_per` translated in turn, each on the image produced by the previous chunk, so peak memory depends on
`ins_per` and not on the number of instances. An image with fewer instances than others in the batch keeps its
image once its instances are done, so its result does not depend on the rest of the batch. Slots past `ins_max`
come back invalid (not translated). Used by jobs/translate.py and jobs/serve.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from instagan import checkpoint
from instagan import masks as M
from instagan.config import Config
from instagan.networks import SetGenerator

DIRECTIONS = {"a2b": "G_ab", "b2a": "G_ba"}


@dataclass
class Translation:
    img: Tensor  # (B, 3, H, W) in [-1, 1]
    masks: Tensor  # (B, N, H, W) in [-1, 1], slot n is the translation of input slot n
    valid: Tensor  # (B, N) bool: input slot n was valid and translated (within ins_max)


class Translator:
    def __init__(self, generator: SetGenerator, ins_max: int = 20, ins_per: int = 2,
                 device: str | torch.device = "cpu", amp_dtype: torch.dtype | None = None):
        if ins_max < 1 or ins_per < 1:
            raise ValueError(f"ins_max ({ins_max}) and ins_per ({ins_per}) must be >= 1")
        self.device = torch.device(device)
        self.G = generator.to(self.device).eval()
        self.ins_max, self.ins_per, self.amp_dtype = ins_max, ins_per, amp_dtype
        self.config: Config | None = None  # the training config, when loaded from a checkpoint

    @classmethod
    def from_checkpoint(cls, directory: str, direction: str = "a2b", **kwargs) -> "Translator":
        """Load only the generator of `direction` ("a2b" or "b2a") from a checkpoint directory."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {sorted(DIRECTIONS)}, got {direction!r}")
        cfg, payload = checkpoint.load(directory)
        G = SetGenerator(cfg.model.ngf, cfg.model.n_blocks)
        G.load_state_dict(payload[DIRECTIONS[direction]])
        tr = cls(G, **kwargs)
        tr.config = cfg
        return tr

    @torch.inference_mode()
    def translate(self, img: Tensor, masks: Tensor, valid: Tensor) -> Translation:
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"img must be (B, 3, H, W), got {tuple(img.shape)}")
        if masks.shape[:1] + masks.shape[2:] != img.shape[:1] + img.shape[2:] or valid.shape != masks.shape[:2]:
            raise ValueError(f"masks {tuple(masks.shape)} / valid {tuple(valid.shape)} do not match img "
                             f"{tuple(img.shape)}: expected (B, N, H, W) and (B, N)")
        if img.shape[2] % 4 or img.shape[3] % 4:
            raise ValueError(f"image height and width must be multiples of 4, got {tuple(img.shape[2:])}")
        dev = self.device
        x = img.to(dev, torch.float32)
        sorted_masks, sorted_valid, order = M.sort_by_area(masks.to(dev, torch.float32), valid.to(dev).bool())
        sorted_masks, sorted_valid = M.limit(sorted_masks, sorted_valid, self.ins_max)
        n_chunks = M.num_chunks(sorted_valid, self.ins_per)
        outs = []
        autocast = torch.autocast(dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        for m in range(n_chunks):
            cm, cv = M.chunk(sorted_masks, sorted_valid, m, self.ins_per)
            with autocast:
                y, bm = self.G(x, cm, cv)
            x = torch.where(cv.any(1)[:, None, None, None], y.float(), x)
            outs.append(bm.float())
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
