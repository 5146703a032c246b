"""Train the binary a-vs-b domain classifier that scores translations (jobs/evaluate.py, instagan.metrics).

    python jobs/train_classifier.py --data-root /tmp/synth64 --size 64 --epochs 15 --out /tmp/clf.pt
    python jobs/train_classifier.py --data-root /tmp/shp2gir --split sample --test-split sample --weights r18.pt

Plain PyTorch, no Ray; instagan.classifier does the work. A torchvision model (default resnet18) trained from
scratch on the real `--split` images, or initialised from a local weights file (`--weights`, loaded with
weights_only=True; a head of another shape is skipped): nothing is downloaded. Augmentation (flip, resized crop,
gaussian blur, noise, colour jitter; torchvision transforms v2) keeps generator artifacts from fooling it (DESIGN.md
section 7: a classifier trained on clean images called most outputs of an UNTRAINED generator "target domain"), and
half the samples are masked (image x union of their instance masks, background 0) so that the same classifier scores
the masked variant. Prints one JSON line with train and test accuracy; writes {"state_dict", "meta": {arch, size,
num_classes, ...}} (weights_only loadable).
"""

from __future__ import annotations

import argparse
import json
import sys

from instagan.classifier import train


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="Parquet data set written by data_prep")
    p.add_argument("--split", default="train", help="split to train on")
    p.add_argument("--test-split", default="test", help="split to report test accuracy on ('' = none)")
    p.add_argument("--size", type=int, default=64, help="images are resized to size x size")
    p.add_argument("--arch", default="resnet18", help="torchvision classification model name")
    p.add_argument("--weights", default=None, help="local state_dict file to start from (nothing is downloaded)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="classifier.pt", help="where to write the classifier")
    a = p.parse_args(argv)
    if a.epochs < 1 or a.size < 16 or a.batch_size < 2:
        p.error("--epochs must be >= 1, --size >= 16, --batch-size >= 2")
    try:
        report = train(a.data_root, a.split, a.test_split or None, a.size, a.arch, a.weights, a.epochs,
                       a.batch_size, a.lr, a.seed, a.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"train_classifier: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
