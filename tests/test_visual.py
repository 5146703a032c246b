"""instagan.visual: what a person sees of a translation (real | translated | reconstructed, with mask overlays)."""

import torch

from instagan import visual
from instagan.config import Config
from instagan.synthetic import make_batch
from instagan.train import build_networks

TINY = {"model": {"ngf": 4, "ndf": 4, "n_blocks": 1}, "data": {"size": 32, "load_size": 36}}


# ---- sample grids (no Ray) -------------------------------------------------------------------------------------

def test_sample_grid_shows_real_translated_reconstructed_with_mask_overlays_and_labels(tmp_path):
    from PIL import Image

    nets = build_networks(Config.from_dict(TINY))
    G, F = nets["G_ab"], nets["G_ba"]
    batch = make_batch("a", 4, 32, ins=(2, 3))
    grid = visual.translation_grid(G, F, batch, ins_max=4, ins_per=2, max_rows=2)
    assert grid.shape == (3, 2 * 32, 6 * 32) and 0 <= grid.min() and grid.max() <= 1
    assert G.training and F.training  # modes left as they were
    real = visual.to_unit(batch["img"][0])
    torch.testing.assert_close(grid[:, :32, :32], real)  # column 0: the real image
    over = grid[:, :32, 32:64]  # column 1: each instance tinted with its palette colour, background untouched
    inside = batch["masks"][0] > 0
    for n in range(int(batch["valid"][0].sum())):
        tint = (1 - visual.ALPHA) * real + visual.ALPHA * visual.PALETTE[n][:, None, None]
        torch.testing.assert_close(over[:, inside[n]], tint[:, inside[n]], rtol=0, atol=1 / 255)  # 8-bit colours
    background = ~inside[batch["valid"][0]].any(0)
    torch.testing.assert_close(over[:, background], real[:, background])
    # The PNG a run writes: both directions under a header naming the six columns, each row named.
    cells = visual.training_cells(nets, {"a": batch, "b": make_batch("b", 4, 32, ins=(1, 2))}, 4, 2)
    assert [len(cells["a"]), len(cells["b"])] == [visual.VIS_ROWS, visual.VIS_ROWS]
    labelled = visual.labelled_training_grid(cells, scale=2)
    _, h, w = labelled.shape
    top, left = h - 2 * visual.VIS_ROWS * (64 + 2), w - 6 * (64 + 2)
    assert 16 <= top <= 60 and 40 <= left <= 120, (top, left)  # a header strip and a row-name strip
    ink = labelled.min(0).values < 0.5  # dark text on white
    assert ink[:top, left:].any() and ink[top:, :left].any()
    assert not ink[:top, :left].any()  # the corner stays blank
    torch.testing.assert_close(labelled[:, top:top + 64:2, left:left + 64:2], real)  # first cell: input, 2x
    path = visual.save_png(labelled, tmp_path / "g.png")
    assert Image.open(path).size == (w, h)
    # Headers are drawn in each column: the ink of column j's header starts within its cell.
    for j in range(6):
        x0 = left + j * 66
        assert ink[:top, x0:x0 + 64].any(), j
