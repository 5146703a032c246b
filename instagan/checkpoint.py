"""Full-state checkpoints: a directory with `state.pt` (state_dicts only) and `config.json`.

    save(state, "ckpt/")                      # networks, optimizers, schedulers, pools, step, epoch
    state = restore("ckpt/")                  # a TrainState that takes the same next step
    cfg, payload = load("ckpt/")              # raw: torch.load(weights_only=True), no pickled code runs
    cfg = validate("ckpt/")                   # before Ray starts: readable, and the weights fit config.json

Writes go to a temporary file first and are renamed into place, so a crash never leaves a torn `state.pt`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from instagan.config import Config

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def save(state, directory: str | os.PathLike) -> Path:
    """Write `state` (an instagan.train.TrainState) to `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **state.state_dict()}
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(state.cfg.to_json())
    return directory


def load(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Config, dict]:
    """Read a checkpoint directory: (config, payload), loaded with weights_only=True. A missing file raises
    FileNotFoundError; an unreadable one (torn, tampered, not a checkpoint) ValueError naming the file and why."""
    directory = Path(directory)
    for name in (STATE_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {name} (is it a checkpoint directory?)")
    try:
        cfg = Config.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"checkpoint {directory / CONFIG_FILE}: {err}") from None
    try:
        payload = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as err:  # torn zip, tampered pickle (weights_only refuses it), not a torch file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"checkpoint {directory / STATE_FILE} cannot be read with weights_only=True "
                         f"({type(err).__name__}: {first[:300]})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {directory / STATE_FILE} holds a {type(payload).__name__}, not a state dict")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint {directory} has format version {version}, this code reads {FORMAT_VERSION}")
    return cfg, payload


def validate(directory: str | os.PathLike, nets: tuple[str, ...] = ("G_ab", "G_ba")) -> Config:
    """Check, without Ray, that a checkpoint can serve: both files readable (weights_only), config.json valid and
    the weights of `nets` the shapes its model section builds. -> its Config. Raises FileNotFoundError or
    ValueError whose message names the file, the network and the first mismatching weights."""
    from instagan.networks import build_generator

    directory = Path(directory)
    cfg, payload = load(directory)
    for name in nets:
        if name not in payload:
            raise ValueError(f"checkpoint {directory / STATE_FILE} has no weights for {name}")
        try:
            build_generator(cfg.model).load_state_dict(payload[name])
        except (RuntimeError, TypeError, AttributeError) as err:
            details = [ln.strip() for ln in str(err).splitlines()[1:4] if ln.strip()]
            m = cfg.model
            raise ValueError(f"checkpoint {directory}: the {name} weights in {STATE_FILE} do not fit the model of "
                             f"{CONFIG_FILE} (arch {m.arch}, ngf {m.ngf}, n_blocks {m.n_blocks}, composite "
                             f"{m.composite}, mask_cond {m.mask_cond}, paint {m.paint}, upsample {m.upsample}): "
                             + " ".join(details or [str(err)[:300]])) from None
    return cfg


def restore(directory: str | os.PathLike, device: str | torch.device = "cpu", nets=None, rank: int = 0):
    """A TrainState loaded from `directory`; `nets` as in TrainState.create (e.g. already DDP-wrapped)."""
    from instagan.train import TrainState

    cfg, payload = load(directory, device)
    state = TrainState.create(cfg, device, nets=nets, rank=rank)
    state.load_state_dict(payload)
    return state
