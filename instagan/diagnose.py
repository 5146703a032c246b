"""Why a run translates the masks but not the image: what the discriminator looks at, and where the generator's
gradients come from, measured at each checkpoint of a run.

    python jobs/diagnose.py --run /tmp/ablate/runs/instagan_paper --data-root /tmp/ablate/data
    stats = diagnose_checkpoint("run/checkpoint_step00000300", batch_a, batch_b)

For each checkpoint, on held-out images (the first chunk of `ins_per` instances, as in training):
- D on image-only and mask-only inputs. D_b judges (image, masks) pairs; "image only" gives it the image with an
  empty instance set, "masks only" the masks over a flat grey image. For real b and for G_ab's fakes the mean
  score of each view; the gap real - fake per view says which input D separates real from fake with. If the
  fakes pass on masks only but not on the image, D's verdict (and G's GAN gradient) rests on the masks.
- Gradient norms of each loss term (GAN, cycle, context, identity, segmentation consistency if on; with the
  config's weights) at G_ab's image
  decoder and mask decoder: which loss drives the image.
- the run's metrics.jsonl, the per-term loss curves.
Writes diagnose.json and diagnose.png into the run folder. No Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from instagan import checkpoint
from instagan import losses as L
from instagan import masks as M
from instagan.train import build_networks, prepare_batch, seg_consistency

LOSS_KEYS = ("loss/G_gan_ab", "loss/cyc_a", "loss/ctx_ab", "loss/idt_ab", "loss/D_b")


def _views(D, img: Tensor, masks: Tensor, valid: Tensor) -> dict[str, float]:
    none = torch.zeros_like(valid)
    return {"full": float(D(img, masks, valid).mean()),
            "image_only": float(D(img, masks, none).mean()),
            "masks_only": float(D(torch.zeros_like(img), masks, valid).mean())}


def _grad_norm(loss: Tensor, params: list[torch.nn.Parameter]) -> float:
    """Norm of d loss / d params; 0 when the loss does not reach them at all (e.g. a detached path)."""
    if not loss.requires_grad:
        return 0.0
    grads = [g for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if g is not None]
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0


def diagnose_checkpoint(ckpt: str | Path, batch_a: dict, batch_b: dict) -> dict:
    """D's views and per-term gradient norms for direction a -> b at one checkpoint (see the module docstring)."""
    cfg, payload = checkpoint.load(ckpt)
    nets = build_networks(cfg)
    for k, net in nets.items():
        net.load_state_dict(payload[k])
        net.eval()  # spectral norm: no power iteration here
    G, F, D = nets["G_ab"], nets["G_ba"], nets["D_b"]
    t, lam = cfg.train, cfg.loss
    union = cfg.model.arch != "instagan"
    a, b = (prepare_batch(x, t.ins_max, torch.device("cpu"), union) for x in (batch_a, batch_b))
    ins_per = 1 if union else t.ins_per
    masks, valid = M.chunk(a["masks"], a["valid"], 0, ins_per)
    b_masks, b_valid = M.chunk(b["masks"], b["valid"], 0, ins_per)
    fake_img, fake_masks = G(a["img"], masks, valid)
    rec_img, rec_masks = F(fake_img, fake_masks, valid)
    idt_img, idt_masks = G(b["img"], b_masks, b_valid)
    weight = M.context_weight(masks, valid, fake_masks, valid)
    terms = {
        "gan": lam.lambda_gan * L.lsgan(D(fake_img, fake_masks, valid), 1.0).mean(),
        "cyc": lam.lambda_cyc * L.masked_l1(rec_img, rec_masks, valid, a["img"], masks,
                                            1 - M.shape_change(masks, valid, fake_masks.detach())
                                            if lam.cyc_free_change else None).mean(),
        "ctx": lam.lambda_ctx * L.context(a["img"], fake_img, weight).mean(),
        "idt": lam.lambda_idt * L.masked_l1(idt_img, idt_masks, b_valid, b["img"], b_masks).mean(),
    }
    if "S" in nets:
        terms["seg"] = lam.lambda_seg * seg_consistency(nets["S"], fake_img, masks, valid, fake_masks).mean()
    parts = {"image_decoder": list(G.dec_img.parameters() if hasattr(G, "dec_img") else G.dec.parameters())}
    if hasattr(G, "dec_mask"):
        parts["mask_decoder"] = list(G.dec_mask.parameters())
    grads = {part: {k: _grad_norm(v, params) for k, v in terms.items()} for part, params in parts.items()}
    with torch.no_grad():
        d_real = _views(D, b["img"], b["masks"], b["valid"])
        d_fake = _views(D, fake_img, fake_masks, valid)
    prog_file = Path(ckpt) / "progress.json"
    prog = json.loads(prog_file.read_text()) if prog_file.exists() else {"step": int(payload["step"])}
    return {**prog, "D_b_real": d_real, "D_b_fake": d_fake,
            "D_b_gap": {k: d_real[k] - d_fake[k] for k in d_real},
            "loss": {k: float(v.detach()) for k, v in terms.items()}, "grad_norm": grads}


def diagnose_run(run: str | Path, data_root: str | Path, images: int = 16, split: str = "test") -> dict:
    """diagnose_checkpoint at every checkpoint of a run folder (instagan.loop layout) on the first `images` images
    of `split`, plus the loss curves of metrics.jsonl. Writes <run>/diagnose.json and <run>/diagnose.png."""
    from instagan.metrics import load_split

    run = Path(run)
    ckpts = sorted(run.glob("checkpoint_step*"), key=lambda p: p.name)
    if not ckpts:
        raise FileNotFoundError(f"{run} has no checkpoint_step* folder")
    size = json.loads((ckpts[0] / checkpoint.CONFIG_FILE).read_text())["data"]["size"]
    batch_a, batch_b = (load_split(data_root, split, d, size, limit=images, batch_size=images)[0][0] for d in "ab")
    points = [diagnose_checkpoint(ck, batch_a, batch_b) for ck in ckpts]
    curves = []
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            curves.append({"step": rec["step"], **{k: rec[k] for k in LOSS_KEYS if k in rec}})
    report = {"run": str(run), "points": points, "loss_curves": curves}
    (run / "diagnose.json").write_text(json.dumps(report, indent=2))
    plot(report, run / "diagnose.png")
    return report


def plot(report: dict, path: str | Path) -> Path:
    """Three panels: loss terms against steps; D_b's real - fake gap per view; gradient norms at the decoders."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
    curves = report["loss_curves"]
    for k in LOSS_KEYS:
        xs = [c["step"] for c in curves if k in c]
        if xs:
            axes[0].plot(xs, [c[k] for c in curves if k in c], label=k.split("/")[1])
    axes[0].set(title="loss terms (unweighted)", xlabel="step", yscale="log")
    pts = report["points"]
    steps = [p["step"] for p in pts]
    for view in ("full", "image_only", "masks_only"):
        axes[1].plot(steps, [p["D_b_gap"][view] for p in pts], marker="o", label=view)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(title="D_b: mean score real b - fake (G_ab)", xlabel="step")
    for part, style in (("image_decoder", "-"), ("mask_decoder", ":")):
        for i, term in enumerate(("gan", "cyc", "ctx", "idt", "seg")):
            ys = [p["grad_norm"].get(part, {}).get(term) for p in pts]
            if all(y is not None for y in ys):
                axes[2].plot(steps, ys, style, marker="o", color=f"C{i}", label=f"{term} {part.split('_')[0]}")
    axes[2].set(title="grad norm at G_ab's decoders (weighted terms)", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def probe(data_root: str | Path, cfg, steps: int = 300, every: int = 50, images: int = 32) -> dict:
    """How fast can each judge learn the shape difference from REAL data alone? Fresh networks of `cfg`, trained on
    the training split for `steps` steps of cfg.train.batch_size images per domain:
    - D_b's image path: real b images ("real") against real a images ("fake": the ellipses a translator that does
      not change the image leaves), masks hidden; accuracy and mean score gap on held-out images;
    - D_b's joint head with the masks drawn as the a images' bounding boxes (a translator that changed the masks
      but not the image), with d_inst_img as configured;
    - the segmenter (instagan.networks.Segmenter) on both domains' images against the union of their masks: IoU.
    -> {"step": [...], "d_image_acc": [...], "d_image_gap": [...], "d_boxes_acc": [...], "seg_iou": [...]}."""
    from instagan.data import local_batches
    from instagan.metrics import load_split
    from instagan.networks import Segmenter, build_discriminator

    torch.manual_seed(cfg.train.seed)
    model = cfg.model
    D_img, D_box = build_discriminator(model), build_discriminator(model)
    S = Segmenter(model.ngf)
    t = cfg.train
    opts = [torch.optim.Adam(net.parameters(), lr=lr, betas=(t.beta1, t.beta2))
            for net, lr in ((D_img, t.lr_d), (D_box, t.lr_d), (S, t.lr_s))]
    test = {d: load_split(data_root, "test", d, cfg.data.size, limit=images, batch_size=images)[0][0] for d in "ab"}
    out: dict[str, list] = {k: [] for k in ("step", "d_image_acc", "d_image_gap", "d_boxes_acc", "seg_iou")}

    def losses(a: dict, b: dict) -> list[Tensor]:
        none_a, none_b = torch.zeros_like(a["valid"]), torch.zeros_like(b["valid"])
        d_img = 0.5 * (L.lsgan(D_img(b["img"], b["masks"], none_b), 1).mean()
                       + L.lsgan(D_img(a["img"], a["masks"], none_a), 0).mean())
        d_box = 0.5 * (L.lsgan(D_box(b["img"], b["masks"], b["valid"]), 1).mean()
                       + L.lsgan(D_box(a["img"], _boxes(a["masks"]), a["valid"]), 0).mean())
        img = torch.cat([a["img"], b["img"]])
        target = torch.cat([M.union(a["masks"], a["valid"]), M.union(b["masks"], b["valid"])])
        seg = torch.nn.functional.binary_cross_entropy_with_logits(S(img), target)
        return [d_img, d_box, seg]

    step, epoch = 0, 0
    while step < steps:
        for a, b in local_batches(data_root, cfg.data.split, t.batch_size, cfg.data.size, cfg.data.load_size, True,
                                  t.seed, epoch, ins_cap=t.ins_max):
            for opt, loss in zip(opts, losses(a, b)):
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            step += 1
            if step % every == 0:
                out["step"].append(step)
                for k, v in _probe_scores(D_img, D_box, S, test).items():
                    out[k].append(v)
            if step >= steps:
                break
        epoch += 1
    return out


@torch.no_grad()
def _probe_scores(D_img: nn.Module, D_box: nn.Module, S: nn.Module, test: dict) -> dict[str, float]:
    """probe's held-out scores: D's accuracy and score gap on images alone, on boxes drawn as masks, S's IoU."""
    for net in (D_img, D_box):
        net.eval()
    ta, tb = test["a"], test["b"]
    sa = D_img(ta["img"], ta["masks"], torch.zeros_like(ta["valid"])).flatten(1).mean(1)
    sb = D_img(tb["img"], tb["masks"], torch.zeros_like(tb["valid"])).flatten(1).mean(1)
    ba = D_box(ta["img"], _boxes(ta["masks"]), ta["valid"]).flatten(1).mean(1)
    bb = D_box(tb["img"], tb["masks"], tb["valid"]).flatten(1).mean(1)
    for net in (D_img, D_box):
        net.train()
    img = torch.cat([ta["img"], tb["img"]])
    truth = torch.cat([M.union(ta["masks"], ta["valid"]), M.union(tb["masks"], tb["valid"])]) > 0.5
    pred = S(img) > 0
    return {"d_image_acc": float(((sb > 0.5).float().mean() + (sa < 0.5).float().mean()) / 2),
            "d_image_gap": float(sb.mean() - sa.mean()),
            "d_boxes_acc": float(((bb > 0.5).float().mean() + (ba < 0.5).float().mean()) / 2),
            "seg_iou": float((pred & truth).sum() / (pred | truth).sum().clamp(min=1))}


def _boxes(masks: Tensor) -> Tensor:
    """Each mask's bounding box as a mask: (B, N, H, W) in [-1, 1] -> the same, filled boxes (empty stays empty)."""
    fg = masks > 0
    box = fg.any(3)[..., :, None] & fg.any(2)[..., None, :]
    return box.to(masks.dtype) * 2 - 1


# ---- does the image follow the masks? ---------------------------------------------------------------------

def follow(ckpt: str | Path, data_root: str | Path, split: str = "test", images: int = 60,
           tol: float = 0.2, sets: dict | None = None, no_change: bool = False) -> dict[str, float]:
    """How far a checkpoint's a->b IMAGE follows its translated masks, per test instance (flat-coloured sets):
    - mask_target: share of translated masks that read as the target shape (the `mask_shape` question, alone);
      mask_target_largest: the same asked of each mask's largest 8-connected component; stray: mean share of a
      mask's pixels outside that component (fragments that spoil its bounding box);
    - img_target_given_mask: among instances whose mask reads as the target shape, the share whose colour region
      in the image does too (`metrics.flat_instance_shapes`);
    - grown_dist, grown_within_tol: over the pixels a translated mask added, the mean largest-channel distance of
      the translated image to the object's input colour (median), and the share within `tol` (the metrics'
      tolerance); object_drift: share of the object's own input pixels whose colour moved by more than `tol`;
    - img_target: share of all instances whose colour region reads as the target shape (`img_shape`'s question).
    sets: config keys changed before the generator is built ({"model.layers": True}: the same weights with another
    base); no_change: the image decoder's change zeroed, so the image is the paint's base alone (what the base
    gives without the decoder's change)."""
    from instagan import metrics as Mt

    cfg, payload = checkpoint.load(ckpt, "cpu")
    if sets:
        cfg = cfg.replace(**sets)
    G = build_networks(cfg)["G_ab"]
    G.load_state_dict(payload["G_ab"])
    G.eval()
    if no_change:
        if G.paint not in ("residual", "extend"):
            raise ValueError(f"no_change needs model.paint residual or extend (a change of a base), got {G.paint!r}")
        last = [m for m in G.dec_img.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
    batches, _ = Mt.load_split(data_root, split, "a", cfg.data.size, images)
    return follow_stats([(batch, Mt.translate(G, batch, 20, 2)[0]) for batch in batches], tol)


def follow_stats(pairs: list, tol: float = 0.2) -> dict[str, float]:
    """`follow`'s measures of [(input batch, its translation with .img, .masks)] (instagan.masks conventions)."""
    from scipy import ndimage

    from instagan import metrics as Mt

    rows = []
    for batch, out in pairs:
        shapes = Mt.flat_instance_shapes(batch["img"], out.img, batch["masks"], batch["valid"], tol=tol)
        for b, n in zip(*np.nonzero(batch["valid"].numpy())):
            m_in, m_out = (batch["masks"][b, n] > 0).numpy(), (out.masks[b, n] > 0).numpy()
            if not m_out.any():
                continue
            labels, _ = ndimage.label(m_out, structure=np.ones((3, 3), bool))
            largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
            x, y = batch["img"][b].float().numpy(), out.img[b].float().numpy()
            dist = np.abs(y - np.median(x[:, m_in], axis=1)[:, None, None]).max(0)
            rows.append({"mask": _rect(m_out) > Mt.RECT_SPLIT, "largest": _rect(largest) > Mt.RECT_SPLIT,
                         "stray": 1 - largest.sum() / m_out.sum(), "img": float(shapes["rect"][b, n]) > Mt.RECT_SPLIT,
                         "grown": dist[m_out & ~m_in], "drift": float((dist[m_in] > tol).mean())})
    hit = [r for r in rows if r["mask"]]
    grown = np.concatenate([r["grown"] for r in rows]) if rows else np.zeros(0)
    mean = (lambda v: float(np.mean(v)) if len(v) else float("nan"))
    return {"instances": len(rows), "mask_target": mean([r["mask"] for r in rows]),
            "mask_target_largest": mean([r["largest"] for r in rows]), "stray": mean([r["stray"] for r in rows]),
            "img_target_given_mask": mean([r["img"] for r in hit]), "img_target": mean([r["img"] for r in rows]),
            "grown_dist": mean(grown),
            "grown_within_tol": mean(grown <= tol), "object_drift": mean([r["drift"] for r in rows])}


def _rect(m: np.ndarray) -> float:
    """Area / bounding-box area of a non-empty binary mask (metrics.rectangularity for one numpy mask)."""
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    return float(m.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)))
