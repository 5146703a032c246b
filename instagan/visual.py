"""Image grids for people: real, translated and reconstructed images, each beside a copy with its masks overlaid.

    grid = translation_grid(G_ab, G_ba, batch_a, ins_max=4, ins_per=2)   # (3, rows * H, 6 * W) in [0, 1]
    save_png(grid, "samples/step_000100.png")
    writer.add_image("samples/a2b", grid, step)                          # TensorBoard takes CHW in [0, 1]

Columns, per input image (one row each): real | real + masks | translated | translated + masks | reconstructed |
reconstructed + masks. Translation runs the sequential inference loop (instagan.infer.Translator: largest instances
first, `ins_per` at a time); reconstruction translates the output back with the other generator. Instance n gets
colour n of PALETTE in every column, so a person can follow an instance through the cycle. No Ray here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

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
    """Colour each valid instance over the image: (3, H, W) in [-1, 1], (N, H, W) in [-1, 1], (N,) -> (3, H, W)
    in [0, 1]. Soft masks blend in proportion to (mask + 1) / 2; later instances paint over earlier ones."""
    out = to_unit(img).cpu()
    for n in valid.nonzero().flatten().tolist():
        w = alpha * to_unit(masks[n]).cpu()[None]
        out = out * (1 - w) + PALETTE[n % len(PALETTE)][:, None, None] * w
    return out


def rows_grid(stages: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """One row per image, two columns per stage (image, image + masks).

    stages: [(img (B, 3, H, W), masks (B, N, H, W), valid (B, N)), ...] -> (3, B * H, 2 * len(stages) * W)."""
    rows = []
    for i in range(stages[0][0].shape[0]):
        cells = []
        for img, masks, valid in stages:
            cells += [to_unit(img[i]).cpu(), overlay(img[i], masks[i], valid[i])]
        rows.append(torch.cat(cells, dim=2))
    return torch.cat(rows, dim=1)


@torch.no_grad()
def translation_grid(G: nn.Module, F: nn.Module, batch: dict[str, Tensor], ins_max: int, ins_per: int,
                     max_rows: int = 4) -> Tensor:
    """real | translated by G | reconstructed by F, for the first `max_rows` images of `batch`.

    G, F: generators (DDP-wrapped or not); their train/eval mode is left as it was. batch: {"img", "masks",
    "valid"} in instagan.masks conventions. -> (3, rows * H, 6 * W) in [0, 1], on the CPU."""
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
    return rows_grid([(img, masks, valid), (fake.img, fake.masks, fake.valid), (rec.img, rec.masks, rec.valid)])


def training_grids(nets: dict[str, nn.Module], batches: dict[str, dict[str, Tensor]], ins_max: int,
                   ins_per: int) -> dict[str, Tensor]:
    """A training run's sample grids: {"a": a -> b -> a of batches["a"], "b": b -> a -> b of batches["b"]}, the
    first VIS_ROWS images each; nets: G_ab and G_ba (DDP-wrapped or not)."""
    pairs = {"a": (nets["G_ab"], nets["G_ba"]), "b": (nets["G_ba"], nets["G_ab"])}
    return {d: translation_grid(G, F, batches[d], ins_max, ins_per, VIS_ROWS) for d, (G, F) in pairs.items()}


def stack_grids(grids: list[Tensor], gap: int = 4) -> Tensor:
    """Grids of equal width one above the other with a white gap: [(3, H_i, W)] -> (3, sum H_i + gaps, W)."""
    parts = []
    for i, g in enumerate(grids):
        if i:
            parts.append(torch.ones(3, gap, g.shape[2]))
        parts.append(g)
    return torch.cat(parts, dim=1)


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
