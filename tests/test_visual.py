"""instagan.visual: what a person sees of a translation (real | translated | reconstructed, with mask overlays)."""

import torch

from instagan import visual
from instagan.config import Config
from instagan.synthetic import make_batch
from instagan.train import build_networks

TINY = {"model": {"ngf": 4, "ndf": 4, "n_blocks": 1}, "data": {"size": 32, "load_size": 36}}


# ---- sample grids (no Ray) -------------------------------------------------------------------------------------

def test_sample_grid_shows_real_translated_reconstructed_with_mask_overlays(tmp_path):
    from PIL import Image

    nets = build_networks(Config.from_dict(TINY))
    G, F = nets["G_ab"], nets["G_ba"]
    batch = make_batch("a", 3, 32, ins=(2, 3))
    grid = visual.translation_grid(G, F, batch, ins_max=4, ins_per=2, max_rows=2)
    assert grid.shape == (3, 2 * 32, 6 * 32) and 0 <= grid.min() and grid.max() <= 1
    assert G.training and F.training  # modes left as they were
    real = visual.to_unit(batch["img"][0])
    torch.testing.assert_close(grid[:, :32, :32], real)  # column 0: the real image
    over = grid[:, :32, 32:64]  # column 1: each instance tinted with its palette colour, background untouched
    inside = batch["masks"][0] > 0
    for n in range(int(batch["valid"][0].sum())):
        tint = (1 - visual.ALPHA) * real + visual.ALPHA * visual.PALETTE[n][:, None, None]
        torch.testing.assert_close(over[:, inside[n]], tint[:, inside[n]])
    background = ~inside[batch["valid"][0]].any(0)
    torch.testing.assert_close(over[:, background], real[:, background])
    path = visual.save_png(visual.stack_grids([grid, grid]), tmp_path / "g.png", scale=2)
    assert Image.open(path).size == (2 * 6 * 32, 2 * (2 * 64 + 4))
