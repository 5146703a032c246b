"""History pool of generated samples shown to the discriminator (CycleGAN's image pool, for image + masks).

Once full, each new fake is, with probability 1/2, swapped for a random stored one (which D sees instead).
A sample is an image with its own set of masks; stored masks are compacted to the valid ones. The pool's
random generator is part of its state, so a resumed run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from instagan import masks as M


class HistoryPool:
    def __init__(self, size: int = 50, seed: int = 0):
        self.size = size
        self.images: list[Tensor] = []
        self.masks: list[Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def query(self, img: Tensor, masks: Tensor, valid: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Samples for D: (B, 3, H, W), (B, N, H, W), (B, N), active (B,) -> img, masks (B, N', H, W), valid.

        Only active samples are stored and may be swapped; inactive ones pass through unchanged (they carry
        zero weight in the loss). Inputs are detached.
        """
        img, masks = img.detach(), masks.detach()
        out: list[tuple[Tensor, Tensor]] = []
        active_list = active.tolist()
        for i in range(img.shape[0]):
            sample = (img[i], masks[i][valid[i]])
            if active_list[i] and self.size > 0:
                if len(self.images) < self.size:
                    self.images.append(sample[0].clone())
                    self.masks.append(sample[1].clone())
                elif torch.rand(1, generator=self.gen).item() > 0.5:
                    j = int(torch.randint(len(self.images), (1,), generator=self.gen))
                    old = (self.images[j], self.masks[j])
                    self.images[j], self.masks[j] = sample[0].clone(), sample[1].clone()
                    sample = old
            out.append(sample)
        return torch.stack([x for x, _ in out]), *M.pad_sets([m for _, m in out])

    def state_dict(self) -> dict:
        return {"size": self.size, "images": [x.cpu() for x in self.images], "masks": [m.cpu() for m in self.masks],
                "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.size = int(state["size"])
        self.images = [x.to(device) for x in state["images"]]
        self.masks = [m.to(device) for m in state["masks"]]
        self.gen.set_state(state["gen"])
