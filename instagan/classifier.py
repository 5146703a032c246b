"""The binary a-vs-b domain classifier that scores translations (instagan.metrics, jobs/evaluate.py): training on
real images with augmentation and masked samples, accuracy, and the weights_only file it writes.
jobs/train_classifier.py has the user's view; plain PyTorch, no Ray.

    report = train("/tmp/synth64", size=64, epochs=15, out="/tmp/clf.pt")    # -> train/test accuracies, skipped
    model, meta = instagan.metrics.load_classifier("/tmp/clf.pt")
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from instagan import masks as M
from instagan.metrics import build_classifier, classification_score, load_split

LABELS = {"a": 0, "b": 1}


def load_images(root: str, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """All rows of both domains at size x size: images (B, 3, S, S) in [-1, 1], union masks (B, 1, S, S) in
    [0, 1], labels (B,) (a 0, b 1), and the rows skipped with their reason."""
    imgs, unions, labels, skipped = [], [], [], []
    for d in ("a", "b"):
        batches, bad = load_split(root, split, d, size, batch_size=64)
        skipped += bad
        if not batches:
            raise ValueError(f"no usable image in {root}/{split}/{d}")
        for b in batches:
            imgs.append(b["img"])
            unions.append(M.union(b["masks"], b["valid"]))
            labels.append(torch.full((b["img"].shape[0],), LABELS[d]))
    return torch.cat(imgs), torch.cat(unions), torch.cat(labels), skipped


def augmenter(size: int) -> tuple[v2.Transform, v2.Transform]:
    """(geometric: image and mask together, photometric: image only), both on [0, 1] images."""
    geometric = v2.Compose([v2.RandomHorizontalFlip(),
                            v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True)])
    photometric = v2.Compose([v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.5),
                              v2.ColorJitter(0.3, 0.3, 0.3, 0.05)])
    return geometric, photometric


def augment_batch(img: torch.Tensor, union: torch.Tensor, tfs: tuple[v2.Transform, v2.Transform],
                  g: torch.Generator) -> torch.Tensor:
    """Per sample: flip + crop (image and mask alike), blur, jitter, noise; masked with probability 1/2.
    (B, 3, S, S) in [-1, 1], (B, 1, S, S) -> (B, 3, S, S) in [-1, 1]."""
    geometric, photometric = tfs
    out = []
    for x, u in zip(img, union):
        x, u = geometric(tv_tensors.Image((x + 1) / 2), tv_tensors.Mask(u))
        x = photometric(x).as_subclass(torch.Tensor)
        if torch.rand((), generator=g) < 0.5:
            x = (x + torch.randn(x.shape, generator=g) * 0.08 * torch.rand((), generator=g)).clamp(0, 1)
        x = x * 2 - 1
        if torch.rand((), generator=g) < 0.5:
            x = x * u.as_subclass(torch.Tensor)
        out.append(x)
    return torch.stack(out)


@torch.no_grad()
def accuracy(model: torch.nn.Module, img: torch.Tensor, union: torch.Tensor, labels: torch.Tensor,
             batch: int = 64) -> dict[str, float]:
    """Accuracy on clean images and on masked images (image x union of its masks)."""
    model.eval()
    hits, hits_m = [], []
    for i in range(0, len(img), batch):
        x, u, y = img[i:i + batch], union[i:i + batch], labels[i:i + batch]
        for out, xs in ((hits, x), (hits_m, x * u)):
            out.append((classification_score(model(xs), "b") == y.float()).float())
    return {"acc": float(torch.cat(hits).mean()), "acc_masked": float(torch.cat(hits_m).mean())}


def train(data_root: str, split: str = "train", test_split: str | None = "test", size: int = 64,
          arch: str = "resnet18", weights: str | None = None, epochs: int = 15, batch_size: int = 32,
          lr: float = 1e-3, seed: int = 0, out: str | Path = "classifier.pt") -> dict:
    """Train, report accuracies, save. -> the report dict (also what the CLI prints)."""
    t0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    img, union, labels, skipped = load_images(data_root, split, size)
    model = build_classifier(arch, weights, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, epochs * -(-len(img) // batch_size)))
    tfs = augmenter(size)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(img), generator=g)
        for i in range(0, len(img), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            loss = F.cross_entropy(model(augment_batch(img[idx], union[idx], tfs, g)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    report = {"arch": arch, "size": size, "epochs": epochs, "weights": weights, "data_root": str(data_root),
              "split": split, "train": {"images": len(img), **accuracy(model, img, union, labels)}}
    if test_split:
        t_img, t_union, t_labels, t_skipped = load_images(data_root, test_split, size)
        report["test"] = {"split": test_split, "images": len(t_img), **accuracy(model, t_img, t_union, t_labels)}
        skipped += t_skipped
    meta = {"arch": arch, "size": size, "num_classes": 2, "labels": "0=a, 1=b", "input": "RGB in [-1, 1]",
            "split": split, "train_acc": report["train"]["acc"],
            "test_acc": report["test"]["acc"] if test_split else None}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, out)
    report.update(out=str(out), skipped=skipped, seconds=round(time.time() - t0, 1))
    return report
