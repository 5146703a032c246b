"""FID and KID between two sets of images, with a feature network read from a LOCAL weights file.

    from instagan.fid import build_feature_net, fid_kid
    net = build_feature_net("inception-fid", "pt_inception-2015-12-05-6726825d.pth")  # the standard FID network
    net = build_feature_net("resnet18", "resnet18.pth", size=224)  # or any torchvision classifier's state_dict
    fid_kid(fake, real, net)  # images (N, 3, H, W) in [-1, 1] -> {"fid", "kid_mean", "kid_std", "kid_subset_size"}

Nothing is ever downloaded: a network is built with random weights and then the given file is loaded into it
(`torch.load(weights_only=True)`); a file that does not fit the architecture is a ValueError naming the file.

- "inception-fid": the InceptionV3 of the FID paper (TensorFlow's 2015-12-05 graph) as pytorch-fid
  (pt_inception-2015-12-05-6726825d.pth) and torch-fidelity (weights-inception-2015-12-05-6726825d.pth) ship it;
  both files have the key layout of torchvision's Inception3(num_classes=1008, aux_logits=False). Built by
  torch-fidelity through torchmetrics (its TF1-compatible resize to 299 px, 2048-d pool features); images are
  quantised to uint8 first, as the reference implementations read PNGs. Only these numbers compare with published
  FIDs, and only at similar sample counts: FID is biased upward for small sets.
- any torchvision classification model name ("resnet18", "inception_v3", "vit_b_16", ...): features are the
  input of its last nn.Linear (the classifier head, which is dropped, so a 1000-class ImageNet file or a
  2-class file from jobs/train_classifier.py both fit); images are resized to `size` and normalised as
  torchvision's ImageNet weights expect.

Features are computed once per set (`features`) and reused: the real target set is shared by every row of an
evaluation. FID and KID themselves are torchmetrics' (FrechetInceptionDistance, KernelInceptionDistance), fed the
features through an identity module. Plain PyTorch, CPU or GPU, no Ray.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_FID = "inception-fid"
KID_SUBSET_SIZE = 50  # KID's subset size on sets of at least this many images (torch-fidelity's default is 1000)
KID_SUBSETS = 100
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# torchvision builds these with an auxiliary head and expects its own ImageNet weights with transform_input=True
_AUX = {"inception_v3": ("AuxLogits.",), "googlenet": ("aux1.", "aux2.")}


class FeatureNet(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> features (B, num_features) float. Always in eval mode, no gradients.

    uint8: quantise to 0..255 and hand that to `net` (which resizes itself: the FID Inception); otherwise resize to
    size x size (bilinear, antialiased) and normalise with ImageNet's mean and std."""

    def __init__(self, net: nn.Module, num_features: int, size: int | None = None, uint8: bool = False,
                 name: str = ""):
        super().__init__()
        self.net, self.num_features, self.size, self.uint8, self.name = net, num_features, size, uint8, name
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureNet":
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float().clamp(-1, 1)
        if self.uint8:
            return self.net(((x + 1) * 127.5).round().to(torch.uint8)).flatten(1)
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.net(((x + 1) / 2 - self.mean) / self.std).flatten(1)


def load_state(path: str | Path) -> dict[str, Tensor]:
    """A state_dict file (or a {"state_dict": ...} wrapper such as jobs/train_classifier.py writes) read with
    weights_only=True onto the CPU. FileNotFoundError if missing; ValueError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature network weights {path} not found (a local file is needed: nothing is "
                                "downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, torn, or a pickle that weights_only refuses
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} cannot be read as a state_dict with weights_only=True: {type(e).__name__}: "
                         f"{first}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state_dict (a dict of tensors), got {type(state).__name__}")
    return state


def _misfit(state: dict[str, Tensor], own: dict[str, Tensor], ignore: tuple[str, ...]) -> str:
    """'' when `state` fits `own` (keys starting with an `ignore` prefix left aside), else what does not fit."""
    kept = {k: v for k, v in state.items() if not k.startswith(ignore)}
    need = {k: v for k, v in own.items() if not k.startswith(ignore)}
    # BatchNorm files older than its num_batches_tracked buffer (torchvision's own ImageNet ones) lack those keys
    missing = [k for k in need if k not in kept and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in kept if k not in need]
    shape = [f"{k} {tuple(kept[k].shape)} vs {tuple(need[k].shape)}" for k in need
             if k in kept and kept[k].shape != need[k].shape]
    parts = [f"{len(v)} {what} (e.g. {', '.join(v[:3])})" for what, v in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", shape)) if v]
    return "; ".join(parts)


def build_feature_net(arch: str = INCEPTION_FID, weights: str | Path | None = None, size: int | None = None,
                      ) -> FeatureNet:
    """The feature network `arch` ("inception-fid" or a torchvision classification model name) with the weights of
    the local file `weights`. size: the input size of a torchvision model (default 299 for inception_v3, else 224;
    ignored by "inception-fid", which always reads 299 px). ValueError naming the file when it does not fit."""
    if weights is None:
        raise ValueError("a local weights file is needed for the FID/KID feature network (nothing is downloaded)")
    state = load_state(weights)
    if arch == INCEPTION_FID:
        return _inception_fid(weights, state)
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": False, "transform_input": True} if arch in _AUX else {}
    try:
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    except ValueError as e:
        raise ValueError(f"unknown feature network {arch!r}: {e} (or use {INCEPTION_FID!r})") from None
    linear = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if not linear:
        raise ValueError(f"torchvision {arch!r} has no linear classifier head to take features before")
    head = linear[-1]
    bad = _misfit(state, model.state_dict(), (head + ".",) + _AUX.get(arch, ()))
    if bad:
        raise ValueError(f"{weights} does not fit torchvision {arch!r}: {bad}")
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict() and not k.startswith(head + ".")},
                          strict=False)
    parent, _, child = head.rpartition(".")
    num_features = model.get_submodule(head).in_features
    setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return FeatureNet(model, num_features, size or (299 if arch == "inception_v3" else 224), name=arch)


def _inception_fid(weights: str | Path, state: dict[str, Tensor]) -> FeatureNet:
    """torch-fidelity's FID InceptionV3 (through torchmetrics) from a file already read with weights_only=True."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:  # torch-fidelity missing: torchmetrics raises on construction instead
        raise ImportError(f"{INCEPTION_FID!r} needs torchmetrics and torch-fidelity: {e}") from None
    fc = state.get("fc.weight")
    if fc is None or tuple(fc.shape) != (1008, 2048) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(f"{weights} does not fit {INCEPTION_FID!r}: expected the FID InceptionV3 state_dict "
                         f"(pt_inception-2015-12-05-6726825d.pth; fc.weight (1008, 2048)), got fc.weight "
                         f"{None if fc is None else tuple(fc.shape)}")
    # torch-fidelity reads the path itself with weights_only=False; load_state above has already read the same
    # file with weights_only=True, which refuses any pickle that could run code.
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(weights))
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shapes
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{weights} does not fit {INCEPTION_FID!r}: {first}") from None
    return FeatureNet(net, 2048, uint8=True, name=INCEPTION_FID)


@torch.no_grad()
def features(images: Tensor | Iterable[Tensor], net: nn.Module, batch_size: int = 32,
             device: str | torch.device = "cpu") -> Tensor:
    """Features of images in [-1, 1]: one (N, 3, H, W) tensor or an iterable of such batches -> (N, d) float64 on
    the CPU, computed batch_size images at a time on `device` (the network is moved there)."""
    net = net.to(device).eval()
    out = []
    for chunk in [images] if isinstance(images, Tensor) else images:
        for i in range(0, chunk.shape[0], batch_size):
            out.append(net(chunk[i:i + batch_size].to(device)).double().cpu())
    if not out:
        raise ValueError("no image to compute features of")
    return torch.cat(out)


class _Given(nn.Module):
    """The torchmetrics 'feature extractor' of features computed beforehand: (N, d) -> (N, d)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, f: Tensor) -> Tensor:
        return f


def fid_kid_features(fake: Tensor, real: Tensor, kid_subsets: int = KID_SUBSETS,
                     kid_subset_size: int | None = None, seed: int = 0) -> dict[str, float | int]:
    """FID and KID of two feature sets (N_fake, d), (N_real, d) -> {"fid", "kid_mean", "kid_std",
    "kid_subset_size"}. KID averages `kid_subsets` random subsets of kid_subset_size (default min(N_fake, N_real,
    KID_SUBSET_SIZE)) drawn with `seed`; at kid_subset_size = N every subset is the whole set and kid_std is 0."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"features must be (N, d) with the same d, got {tuple(fake.shape)} and {tuple(real.shape)}")
    n = min(fake.shape[0], real.shape[0])
    if n < 2:
        raise ValueError(f"FID and KID need at least 2 images per set, got {fake.shape[0]} and {real.shape[0]}")
    size = min(n, KID_SUBSET_SIZE) if kid_subset_size is None else kid_subset_size
    if not 2 <= size <= n:
        raise ValueError(f"kid_subset_size must be in [2, {n}], got {size}")
    given = _Given(fake.shape[1])
    fake, real = fake.double().cpu(), real.double().cpu()
    fid = FrechetInceptionDistance(feature=given)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with warnings.catch_warnings():  # "KID will save all extracted features in buffer": they are in memory anyway
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=given, subsets=kid_subsets, subset_size=size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # the subsets are drawn with the global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset_size": size}


def fid_kid(fake: Tensor | Iterable[Tensor], real: Tensor | Iterable[Tensor], net: nn.Module,
            batch_size: int = 32, device: str | torch.device = "cpu", **kid) -> dict[str, float | int]:
    """FID and KID between fake and real images in [-1, 1] ((N, 3, H, W) tensors or iterables of batches) in the
    feature space of `net` (build_feature_net) -> as fid_kid_features (kid: its KID arguments)."""
    return fid_kid_features(features(fake, net, batch_size, device), features(real, net, batch_size, device), **kid)
