"""Configuration dataclasses for InstaGAN.

Frozen dataclasses with plain-dict round trips: Ray Tune and Ray Train hand the worker a dict, and the
resolved config is written to the run folder as JSON. Unknown keys are an error that names the key.

    cfg = Config.from_dict({"model": {"ngf": 16}, "train": {"ins_per": 2}})
    cfg.to_dict()  # nested plain dict, JSON-serialisable
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

AMP = ("none", "bf16", "fp16", "auto")  # autocast choices of --amp (train.amp takes "none", "bf16" or "auto")
_WARNED: set[str] = set()


def native_bf16(device="cpu") -> bool:
    """Whether bf16 autocast runs on native instructions on `device`: a CUDA device with bf16 support, or a CPU
    with AVX512-BF16 or AMX. Elsewhere oneDNN emulates bf16: on an AVX2-only AMD EPYC (2026-12-05) a 64-channel 3x3
    conv under bf16 autocast took 160x the time of the same conv in fp32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def amp_dtype(name: str, device="cpu"):
    """The torch autocast dtype of an --amp or train.amp value on `device` (None for "none"): "auto" is bf16 where
    bf16 is native (`native_bf16`), else None (fp32). "bf16" where it is not native still gives bf16, with a
    warning (once per device type): it is many times slower there. ValueError for other names."""
    import torch

    if name not in AMP:
        raise ValueError(f"amp must be one of {', '.join(AMP)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    kind = torch.device(device).type
    if name == "bf16" and kind in ("cpu", "cuda") and kind not in _WARNED and not native_bf16(device):
        _WARNED.add(kind)
        warnings.warn(f"bf16 autocast on this {kind} is emulated (no AVX512-BF16/AMX or bf16 CUDA support) and "
                      f"many times slower than fp32; amp 'auto' picks fp32 here", RuntimeWarning, stacklevel=2)
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError naming the key, the choices and the value, unless value is one of the choices."""
    if value not in choices:
        names = [repr(c) for c in choices]
        raise ValueError(f"{key} must be {', '.join(names[:-1])} or {names[-1]}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    ngf: int = 64  # generator base width (paper and ref: 64)
    ndf: int = 64  # discriminator base width (paper and ref: 64)
    n_blocks: int = 9  # residual blocks in each generator encoder (ref passes 9 to the set generator)
    # "instagan"; ablation baselines (paper fig. 9): "cyclegan" (image only; double ngf for a fair size, as the
    # paper did) or "cyclegan_seg" (image + the union of the masks as one extra channel, translated jointly)
    arch: str = "instagan"
    # Levers beyond the paper (off = the paper's recipe; README "Quality" has what each did):
    composite: bool = False  # output = input outside the input and translated masks; G paints only inside them
    mask_cond: bool = False  # the image decoder sees the input and translated mask unions
    paint: str = "direct"  # the image decoder's output is the image ("direct"), a change of it ("residual"), a
    # colour with a copy gate ("gated"), or a change of the input with each object grown in its own colour ("extend")
    upsample: str = "deconv"  # "deconv" (the authors' transposed convs) or "resize" (nearest x2 + conv 3x3)
    # the image follows the translated masks where they are > 0 (as the metrics read them), not in proportion to
    # their soft values: composite, mask_cond and paint "extend" see them thresholded (they are detached there)
    sharp: bool = False
    # the image decoder's last conv starts at zero ("zero") instead of N(0, 0.02) ("normal", the authors'): with paint
    # "residual" or "extend" the first image is then exactly the input (or the objects grown into their translated
    # masks) instead of that plus a change of about +-1 of noise, which the GAN must first learn to remove
    paint_init: str = "normal"
    # with paint "extend": where an object leaves a pixel (inside its input mask, outside every translated mask) the
    # base is the local background colour, not the object's (networks.background_fill)
    vacate: bool = False
    # the image follows only the part of each translated mask that is connected (8-neighbours, inside the mask) to its
    # input instance: stray fragments the mask branch leaves away from the object are not painted
    connected: bool = False
    # with paint "extend": the base paints the translated objects as layers (networks.layer_colours): where translated
    # masks overlap, the pixel is the colour of the one with the highest mask value, not a blend of both; and an
    # object's input pixels on its mask's rim (a mix with the old surroundings) are repainted in its colour
    layers: bool = False
    d_inst_img: bool = False  # D's instance branch sees each mask with the image inside it (not masks alone)
    d_img_head: bool = False  # D has a second head judging the image alone
    d_mask: bool = False  # D has a head judging each mask alone (its shape, per instance)

    def __post_init__(self) -> None:
        _one_of("model.arch", self.arch, ("instagan", "cyclegan", "cyclegan_seg"))
        _one_of("model.upsample", self.upsample, ("deconv", "resize"))
        _one_of("model.paint", self.paint, ("direct", "residual", "gated", "extend"))
        _one_of("model.paint_init", self.paint_init, ("normal", "zero"))
        for key in ("vacate", "layers"):
            if getattr(self, key) and self.paint != "extend":
                raise ValueError(f"model.{key} needs model.paint 'extend', got {self.paint!r}")
        if self.paint_init == "zero" and self.paint not in ("residual", "extend"):
            raise ValueError(f"model.paint_init 'zero' needs model.paint 'residual' or 'extend' (a zero change), got "
                             f"paint {self.paint!r}")


@dataclass(frozen=True)
class LossConfig:
    lambda_cyc: float = 10.0  # cycle loss weight (paper and ref: 10)
    lambda_idt: float = 10.0  # identity loss weight (paper: 10; ref: 10 * 1.0)
    lambda_ctx: float = 10.0  # context-preserving loss weight (paper: 10; ref: 10 * 1.0)
    lambda_gan: float = 1.0  # adversarial loss weight of the generators (paper: 1)
    # beyond the paper (0 = off): a segmenter trained on real images must find the translated masks' union in the
    # translated image, within the pixels the chunk may change (instagan.networks.Segmenter)
    lambda_seg: float = 0.0
    # beyond the paper (0 = off): context loss inside the objects too, where a pixel is the same instance before and
    # after (input mask and its translation): for translations that change shapes, not appearance
    lambda_keep: float = 0.0
    # beyond the paper (False = off): the image cycle loss skips the pixels whose instance shape the translation
    # changed (masks.shape_change): what a grown object covers is lost, and asking for it back rewards keeping the
    # old shape in the image
    cyc_free_change: bool = False


@dataclass(frozen=True)
class TrainConfig:
    lr_g: float = 2e-4  # Adam lr of both generators (paper 2e-4)
    lr_d: float = 1e-4  # Adam lr of both discriminators (paper 1e-4; ref uses 2e-4)
    lr_s: float = 1e-3  # Adam lr of the segmenter (only with loss.lambda_seg > 0)
    beta1: float = 0.5  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    epochs: int = 100  # epochs at constant lr (paper COCO: 100)
    epochs_decay: int = 100  # epochs of linear decay to 0 after that (paper COCO: 100)
    ins_max: int = 4  # at most this many instances per image are used, largest first (ref train: 4)
    ins_per: int = 2  # instances per sequential chunk (ref: 2)
    pool_size: int = 50  # history pool of generated samples shown to D (CycleGAN image pool)
    batch_size: int = 1  # images per domain per step on one worker
    seed: int = 0  # seeds weights, pools and data order
    # mixed precision of the networks' forward and backward: "none" (fp32), "bf16" (autocast; weights, Adam state
    # and losses stay fp32) or "auto" (bf16 where it is native: GPUs, CPUs with AVX512-BF16/AMX; else fp32:
    # config.native_bf16 has the rule and its number).
    amp: str = "none"
    # Memory machinery of the training step (instagan.memory): "lean" keeps less for backward (dtype-preserving
    # padding, saved-tensor hooks, discriminator instance features recomputed in groups) and, on CPU, returns
    # freed heap to the OS twice per chunk; "plain" runs the step without it; "auto" picks lean for paper-size
    # steps on CPU, plain for small ones and on CUDA (instagan.memory.use_lean has the rule and its numbers).
    memory: str = "auto"
    # torch.compile the generators' layer stacks (inductor; CPU needs a C++ compiler; the discriminators stay eager:
    # spectral norm writes buffers in the forward). The mask batches are then padded to batch x ins_per so each
    # stack compiles once per shape; the first step pays the compile time (instagan.bench_step reports it). Losses
    # match eager within 1e-2 relative after 2 steps (tests/test_bench_step.py). Slower on the small CPU model
    # (README "Benchmark").
    compile: bool = False
    # Networks' weights (and so their activations) in channels_last memory format: NHWC convolutions, the layout
    # cuDNN's tensor-core kernels and oneDNN prefer (python -m instagan.bench --channels-last measures it).
    channels_last: bool = False

    def __post_init__(self) -> None:
        _one_of("train.amp", self.amp, ("none", "bf16", "auto"))
        _one_of("train.memory", self.memory, ("auto", "lean", "plain"))


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # Parquet data set written by data_prep (<root>/<split>/<a|b>/part-*.parquet); "" = generated
    split: str = "train"  # split to train on
    size: int = 200  # crop size fed to the networks (paper COCO 200); must be divisible by 4
    load_size: int = 220  # images are resized to this before the random crop (about 10% larger)
    flip: bool = True  # random horizontal flip (same for image and masks)


@dataclass(frozen=True)
class RunConfig:
    name: str = "instagan"  # run name: the run folder is <storage_path>/<name>; re-using both resumes the run
    storage_path: str = ""  # folder (shared by all nodes) or URI holding runs; "" = ~/ray_results
    workers: int = 2  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False  # one GPU per worker (NCCL); False: CPU workers (gloo)
    cpus_per_worker: float = 1.0  # logical CPUs reserved per worker (fractions are fine on a laptop)
    max_steps: int = 0  # stop after this many steps (0 = no limit: train epochs + epochs_decay)
    log_every: int = 10  # TensorBoard scalars every N steps; ray.train.report too (at most every 2 s)
    image_every: int = 100  # write image grids (TensorBoard and samples/step_XXXXXX.png) every M steps (0 = never)
    checkpoint_every: int = 500  # full-state checkpoint every K steps (0 = only per epoch and at the end)
    num_to_keep: int = 2  # most recent checkpoints kept in the run folder
    max_failures: int = 1  # worker-group restarts from the latest checkpoint within one run (-1 = unlimited)
    val_every: int = 0  # validation metrics (instagan.metrics) every N steps and at the end (0 = never)
    val_split: str = "test"  # split of data.root whose first val_images rows per domain form the validation set
    val_images: int = 16  # images per domain in the fixed validation set (resized to data.size, no augmentation)
    classifier: str = ""  # domain classifier weights for val/cls_* (jobs/train_classifier.py); "" = none
    verbose: bool = False  # also print Ray Train's per-report logs and its known-harmless warnings

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ValueError(f"run.name must be a folder name inside the storage path (no '/', '\\', '.' or "
                             f"'..'), got {self.name!r}")
        if self.workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError(f"run.workers ({self.workers}) must be >= 1 and run.cpus_per_worker "
                             f"({self.cpus_per_worker}) > 0")
        if self.log_every < 1 or self.num_to_keep < 1:
            raise ValueError(f"run.log_every ({self.log_every}) and run.num_to_keep ({self.num_to_keep}) must be >= 1")
        if min(self.max_steps, self.image_every, self.checkpoint_every) < 0 or self.max_failures < -1:
            raise ValueError("run.max_steps, run.image_every and run.checkpoint_every must be >= 0, "
                             "run.max_failures >= -1")
        if self.val_every < 0 or self.val_images < 1:
            raise ValueError(f"run.val_every ({self.val_every}) must be >= 0 and run.val_images "
                             f"({self.val_images}) >= 1")


_SECTIONS = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig, "data": DataConfig, "run": RunConfig}

# Ranges of the numeric keys: key -> (lowest allowed, whether the lowest itself is allowed). Every float must also
# be finite. Keys not listed take any value of their type (seed) or are checked in __post_init__ (run.*).
_RANGES: dict[str, tuple[float, bool]] = {
    "model.ngf": (1, True), "model.ndf": (1, True), "model.n_blocks": (0, True),
    **{f"loss.{k}": (0.0, True) for k in ("lambda_cyc", "lambda_idt", "lambda_ctx", "lambda_gan", "lambda_seg",
                                                  "lambda_keep")},
    **{f"train.{k}": (0.0, False) for k in ("lr_g", "lr_d", "lr_s")},
    "train.beta1": (0.0, True), "train.beta2": (0.0, True),
    "train.epochs": (0, True), "train.epochs_decay": (0, True), "train.pool_size": (0, True),
}
_BELOW_ONE = ("train.beta1", "train.beta2")  # Adam's betas are in [0, 1)


def _check_range(key: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key '{key}' must be a finite number, got {value!r}")
    if key in _RANGES:
        low, inclusive = _RANGES[key]
        if value < low or (value == low and not inclusive):
            raise ValueError(f"config key '{key}' must be {'>=' if inclusive else '>'} {low}, got {value!r}")
    if key in _BELOW_ONE and value >= 1:
        raise ValueError(f"config key '{key}' must be < 1, got {value!r}")


def section_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config section '{where}' must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) in '{where}': {', '.join(unknown)} (known: {', '.join(known)})")
    out = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        try:
            if isinstance(default, bool):
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "yes")
                value = bool(value)
            elif isinstance(default, int):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            elif isinstance(default, str):
                value = str(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key '{where}.{name}' expects {type(default).__name__}, got {value!r}") from None
        _check_range(f"{where}.{name}", value)
        out[name] = value
    return cls(**out)


class Sections:
    """What a frozen dataclass of config sections shares (Config, instagan.segment_train.SegmentConfig): plain-dict,
    JSON and YAML round trips with unknown sections and keys as errors, and overrides by dotted keys. SECTIONS: the
    section name -> its dataclass."""

    SECTIONS: ClassVar[dict[str, type]] = {}

    @classmethod
    def _upgrade(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Older spellings of the sections -> today's (a subclass's hook)."""
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None):
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s): {', '.join(unknown)} (known: {', '.join(cls.SECTIONS)})")
        values = cls._upgrade(values)
        return cls(**{k: section_from_dict(c, values.get(k, {}), k) for k, c in cls.SECTIONS.items()})

    @classmethod
    def from_file(cls, path: str | Path):
        """A YAML (or JSON) config file with the sections. Raises ValueError naming the file."""
        import yaml

        try:
            with open(path) as f:  # a stream, so that YAML's error names the file (and line) rather than a string
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
        try:
            return cls.from_dict(values)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **dotted: Any):
        """Override by dotted keys: cfg.replace(**{"train.ins_per": 1})."""
        values = self.to_dict()
        for key, value in dotted.items():
            section, _, name = key.partition(".")
            if section not in values or not name:
                raise ValueError(f"unknown config key '{key}' (use section.name, sections: "
                                 f"{', '.join(self.SECTIONS)})")
            values[section][name] = value
        return type(self).from_dict(values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass(frozen=True)
class Config(Sections):
    SECTIONS: ClassVar[dict[str, type]] = _SECTIONS
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        t, d = self.train, self.data
        if t.ins_per < 1 or t.ins_max < 1:
            raise ValueError(f"ins_per ({t.ins_per}) and ins_max ({t.ins_max}) must be >= 1")
        if t.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {t.batch_size}")
        if d.size % 4 != 0 or d.size < 32:
            raise ValueError(f"data.size must be a multiple of 4 and >= 32, got {d.size}")
        if d.load_size < d.size:
            raise ValueError(f"data.load_size ({d.load_size}) must be >= data.size ({d.size})")

    @classmethod
    def _upgrade(cls, values: dict[str, Any]) -> dict[str, Any]:
        train = values.get("train")
        if isinstance(train, dict) and "trim_heap" in train:  # config.json of checkpoints before train.memory
            train = dict(train)
            trim = train.pop("trim_heap")
            train.setdefault("memory", "lean" if trim in (True, "true", "True", 1) else "plain")
            values["train"] = train
        return values
