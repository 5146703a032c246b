"""Image grids for people: real, translated and reconstructed images, each beside a copy with its masks overlaid.

    grid = translation_grid(G_ab, G_ba, batch_a, ins_max=4, ins_per=2)   # (3, rows * H, 6 * W) in [0, 1]
    writer.add_image("samples/a2b", grid, step)                          # TensorBoard takes CHW in [0, 1]
    cells = training_cells(nets, {"a": batch_a, "b": batch_b}, 4, 2)
    save_png(labelled_training_grid(cells, scale=2), "samples/step_000100.png")   # with column and row names

Columns, per input image (one row each): input | input + masks | translated | translated + masks | reconstructed |
reconstructed + masks (COLUMNS). Translation runs the sequential inference loop (instagan.infer.Translator: largest
instances first, `ins_per` at a time); reconstruction translates the output back with the other generator.
Instance n gets colour n of PALETTE in every column, so a person can follow an instance through the cycle. No Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import draw_segmentation_masks

from instagan.infer import Translator

PALETTE = torch.tensor([  # distinct, saturated colours in [0, 1] (instance n gets PALETTE[n % len])
    (0.90, 0.10, 0.10), (0.10, 0.55, 0.95), (0.15, 0.80, 0.20), (0.95, 0.75, 0.05), (0.70, 0.20, 0.85),
    (0.00, 0.80, 0.80), (0.95, 0.45, 0.10), (0.95, 0.40, 0.70), (0.55, 0.35, 0.15), (0.50, 0.50, 0.50),
])
ALPHA = 0.5  # opacity of an instance's colour over the image
VIS_ROWS = 4  # images per direction in a training run's sample grids


def to_unit(img: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1]. Any shape."""
    return ((img.float() + 1) / 2).clamp(0, 1)


def overlay(img: Tensor, masks: Tensor, valid: Tensor, alpha: float = ALPHA) -> Tensor:
    """Colour each valid instance over the image (torchvision's draw_segmentation_masks): (3, H, W) in [-1, 1],
    (N, H, W) in [-1, 1], (N,) -> (3, H, W) in [0, 1]. A pixel is an instance's where its mask is > 0, as the
    metrics read masks; instance n gets PALETTE[n]; pixels of two instances at once are drawn dark."""
    out = to_unit(img).cpu()
    keep = valid.bool().cpu().nonzero().flatten().tolist()
    if not keep:
        return out
    colours = [tuple(int(round(255 * c)) for c in PALETTE[n % len(PALETTE)].tolist()) for n in keep]
    return draw_segmentation_masks(out, masks.cpu()[keep] > 0, alpha=alpha, colors=colours)


COLUMNS = ("input", "input + masks", "translated", "translated + masks", "reconstructed", "reconstructed + masks")


def rows_cells(stages: list[tuple[Tensor, Tensor, Tensor]]) -> list[list[Tensor]]:
    """One row per image, two cells per stage (image, image + masks), each (3, H, W) in [0, 1] on the CPU.
    stages: [(img (B, 3, H, W), masks (B, N, H, W), valid (B, N)), ...]."""
    rows = []
    for i in range(stages[0][0].shape[0]):
        cells = []
        for img, masks, valid in stages:
            cells += [to_unit(img[i]).cpu(), overlay(img[i], masks[i], valid[i])]
        rows.append(cells)
    return rows


def cells_image(rows: list[list[Tensor]]) -> Tensor:
    """Rows of equal cells (3, H, W) as one unlabelled image (3, rows * H, columns * W), e.g. for TensorBoard."""
    return torch.cat([torch.cat(row, dim=2) for row in rows], dim=1)


@torch.no_grad()
def translation_cells(G: nn.Module, F: nn.Module, batch: dict[str, Tensor], ins_max: int, ins_per: int,
                      max_rows: int = 4) -> list[list[Tensor]]:
    """real | translated by G | reconstructed by F (each alone and with its masks: the COLUMNS), for the first
    `max_rows` images of `batch`: rows of 6 cells (3, H, W) in [0, 1], on the CPU.

    G, F: generators (DDP-wrapped or not); their train/eval mode is left as it was. batch: {"img", "masks",
    "valid"} in instagan.masks conventions."""
    G, F = getattr(G, "module", G), getattr(F, "module", F)
    modes = (G.training, F.training)
    device = next(G.parameters()).device
    try:
        img, masks, valid = (batch[k][:max_rows] for k in ("img", "masks", "valid"))
        valid = valid.bool()
        fake = Translator(G, ins_max, ins_per, device).translate(img, masks, valid)
        rec = Translator(F, ins_max, ins_per, device).translate(fake.img, fake.masks, fake.valid)
    finally:
        G.train(modes[0])
        F.train(modes[1])
    return rows_cells([(img, masks, valid), (fake.img, fake.masks, fake.valid), (rec.img, rec.masks, rec.valid)])


def translation_grid(G: nn.Module, F: nn.Module, batch: dict[str, Tensor], ins_max: int, ins_per: int,
                     max_rows: int = 4) -> Tensor:
    """`translation_cells` as one unlabelled image (TensorBoard): (3, rows * H, 6 * W) in [0, 1]."""
    return cells_image(translation_cells(G, F, batch, ins_max, ins_per, max_rows))


def training_cells(nets: dict[str, nn.Module], batches: dict[str, dict[str, Tensor]], ins_max: int,
                   ins_per: int) -> dict[str, list[list[Tensor]]]:
    """A training run's samples: {"a": a -> b -> a of batches["a"], "b": b -> a -> b of batches["b"]}, the first
    VIS_ROWS images each, as `translation_cells`; nets: G_ab and G_ba (DDP-wrapped or not)."""
    pairs = {"a": (nets["G_ab"], nets["G_ba"]), "b": (nets["G_ba"], nets["G_ab"])}
    return {d: translation_cells(G, F, batches[d], ins_max, ins_per, VIS_ROWS) for d, (G, F) in pairs.items()}


def labelled_training_grid(cells: dict[str, list[list[Tensor]]], scale: int = 1) -> Tensor:
    """The PNG a person opens: both directions' rows under a header naming the COLUMNS, each row named by its
    direction ("a -> b -> a" or "b -> a -> b"). -> (3, H', W') in [0, 1]."""
    names = {"a": "a -> b -> a", "b": "b -> a -> b"}
    rows = [row for d in cells for row in cells[d]]
    return labelled_grid(rows, list(COLUMNS), [names[d] for d in cells for _ in cells[d]], scale=scale)


def labelled_grid(cells: list[list[Tensor]], col_labels: list[str], row_labels: list[str], scale: int = 1,
                  gap: int = 2) -> Tensor:
    """Cells (3, H, W) in [0, 1], rows x columns, enlarged `scale` times (nearest), with a header strip naming
    each column and a left strip naming each row, on white. -> (3, H', W') in [0, 1]."""
    from PIL import ImageDraw, ImageFont

    h, w = (d * scale for d in cells[0][0].shape[-2:])
    font = ImageFont.load_default(size=12)
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max(draw_probe.textlength(t, font=font) for t in row_labels) + 8 if row_labels else 0
    # Column labels wrap onto a second line when wider than a cell.
    wrapped = [_wrap(t, w, font, draw_probe) for t in col_labels]
    top = 16 * max(len(t) for t in wrapped) + 4
    ncols = max(len(r) for r in cells)
    canvas = Image.new("RGB", (int(left) + ncols * (w + gap), top + len(cells) * (h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((int(left) + j * (w + gap) + 2, 2 + 16 * k), line, fill="black", font=font)
    for i, row in enumerate(cells):
        y = top + i * (h + gap)
        if i < len(row_labels):
            draw.text((4, y + h // 2 - 7), row_labels[i], fill="black", font=font)
        for j, cell in enumerate(row):
            arr = (cell.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            im = Image.fromarray(np.ascontiguousarray(arr)).resize((w, h), Image.NEAREST)
            canvas.paste(im, (int(left) + j * (w + gap), y))
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def _wrap(text: str, width: int, font, draw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        cand = f"{line} {word}".strip()
        if line and draw.textlength(cand, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = cand
    return lines + [line]


def save_png(grid: Tensor, path: str | Path, scale: int = 1) -> Path:
    """Write a (3, H, W) image in [0, 1] as PNG, enlarged `scale` times without smoothing (small training images
    stay legible); parent folders are created. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(np.ascontiguousarray(arr))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)
    return path
