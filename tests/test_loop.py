"""instagan.loop in one process (train_local): what a run folder holds, and a stopped run that resumes like an
uninterrupted one. The same loop under Ray Train: tests/test_train_ray.py."""

import json
import re

import pytest
import torch
from PIL import Image

from data_prep.synthetic import write_synthetic
from instagan import checkpoint
from instagan.config import Config
from instagan.loop import train_local
from instagan.train import TrainState


def test_a_local_run_folder_holds_metrics_grids_tensorboard_and_checkpoints(tmp_path, capsys):
    write_synthetic(tmp_path / "data", n=12, size=32, test_fraction=0.25)  # 9 training images: 5 batches of 2
    cfg = Config.from_dict({"model": {"ngf": 4, "ndf": 4, "n_blocks": 1},
                            "data": {"root": str(tmp_path / "data"), "size": 32, "load_size": 36},
                            "train": {"ins_max": 4, "ins_per": 2, "batch_size": 2, "epochs": 1, "epochs_decay": 1},
                            "run": {"max_steps": 6, "checkpoint_every": 4, "image_every": 3, "log_every": 2}})
    last = train_local(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint_step*")) == ["checkpoint_step00000004",
                                                                     "checkpoint_step00000006"]
    assert last == run / "checkpoint_step00000006"
    prog = checkpoint.progress(last)
    assert prog["step"] == 6 and prog["epoch"] == 1 and prog["epoch_step"] == 1 and prog["world_size"] == 1
    assert TrainState.from_checkpoint(last).step == 6
    logs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [2, 4, 6]
    assert {"loss/G", "loss/D_a", "loss/D_b", "loss/G_gan_ab", "lr/G", "train/chunks", "time/step_s",
            "time/cpu_s"} <= set(logs[0])
    assert logs[-1]["epoch"] == 1 and logs[-1]["lr/G"] < logs[0]["lr/G"]  # the second epoch decays the lr
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_000003.png", "step_000006.png"]
    with Image.open(run / "samples" / "step_000006.png") as im:  # 4 rows per direction, 6 columns, 32 px x 4
        left, top = im.size[0] - 6 * (128 + 2), im.size[1] - 2 * 4 * (128 + 2)  # + row names, column headers
        assert 40 <= left <= 120 and 16 <= top <= 60, im.size
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # One progress line per run.log_every steps: step/total, epoch, samples/s, losses, elapsed, ETA.
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[instagan] step ")]
    assert [ln.split(" | ")[0] for ln in lines] == ["[instagan] step 2/6 (33%)", "[instagan] step 4/6 (67%)",
                                                    "[instagan] step 6/6 (100%)"]
    assert all(re.search(r"epoch [12]/2 \| [\d.]+ samples/s \| G [\d.]+ D_a [\d.]+ D_b [\d.]+ \| \d+s elapsed \| "
                         r"ETA \d+s$", ln) for ln in lines), lines
    assert lines[-1].endswith("ETA 0s")


def test_local_run_stopped_part_way_resumes_like_an_uninterrupted_run(tmp_path):
    """train_local(resume=True) continues from the latest checkpoint, mid-epoch: same weights as one run."""
    write_synthetic(tmp_path / "data", n=12, size=32, test_fraction=0.25)  # 9 training images: 5 batches of 2
    cfg = Config.from_dict({"model": {"ngf": 8, "ndf": 8, "n_blocks": 1, "composite": True, "paint": "residual"},
                            "data": {"root": str(tmp_path / "data"), "size": 32, "load_size": 36},
                            "train": {"ins_max": 4, "ins_per": 2, "batch_size": 2, "pool_size": 2, "epochs": 1,
                                      "epochs_decay": 2},
                            "run": {"max_steps": 7, "checkpoint_every": 100, "image_every": 0, "log_every": 1}})
    whole = TrainState.from_checkpoint(train_local(cfg, tmp_path / "whole"))
    part = train_local(cfg.replace(**{"run.max_steps": 3}), tmp_path / "part")
    assert part.name.endswith("00000003")
    resumed = TrainState.from_checkpoint(train_local(cfg, tmp_path / "part", resume=True))
    assert resumed.step == whole.step == 7 and resumed.epoch == whole.epoch == 1
    for k, net in whole.nets.items():
        for (name, p), q in zip(net.named_parameters(), resumed.nets[k].parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=f"{k}.{name}")
    # metrics.jsonl of the resumed run holds each logged step once, as the uninterrupted one does.
    steps = {run: [json.loads(ln)["step"] for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("whole", "part")}
    assert steps["part"] == steps["whole"] == list(range(1, 8))
    # Another model in the same folder is refused, not silently mixed.
    with pytest.raises(ValueError, match="model config"):
        train_local(cfg.replace(**{"model.ngf": 4}), tmp_path / "part", resume=True)


def test_progress_line_counts_epochs_against_the_schedule_only_without_a_budget():
    from instagan.config import Config
    from instagan.loop import Clock, Progress

    cfg = Config.from_dict({"train": {"epochs": 6, "epochs_decay": 4}})
    metrics = {"step": 40, "epoch": 13, "loss/G": 2.0}
    budget = Progress(cfg, 600.0, Clock(), 0).line(metrics)
    assert "CPU-s | epoch 14 |" in budget and "14/10" not in budget
    steps = Progress(cfg, None, Clock(), 0).line(metrics)
    assert "epoch 14/10" in steps and "G 2.000" in steps
