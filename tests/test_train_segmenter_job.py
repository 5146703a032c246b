"""jobs/train_segmenter.py: command line and config (no Ray), then two Ray Train DDP workers for a few steps:
checkpoints, metrics and the test split's report appear, and a second run of the same name resumes.

    .venv/bin/python -m pytest -q tests/test_train_segmenter_job.py               # about a minute
    .venv/bin/python -m pytest -q tests/test_train_segmenter_job.py -m "not slow" # a few seconds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from instagan.segment import InstanceSegmenter  # noqa: E402
from jobs import train_segmenter as job  # noqa: E402


def test_config_shortcuts_and_errors(tmp_path, capsys):
    cfg_file = tmp_path / "seg.yaml"
    cfg_file.write_text("model: {arch: small, width: 32}\ntrain: {steps: 50}\n")
    assert job.main(["--config", str(cfg_file), "--steps", "7", "--domains", "ab", "--set", "train.lr=1e-4",
                     "--storage-path", str(tmp_path), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["width"] == 32 and cfg["train"]["steps"] == 7 and cfg["train"]["lr"] == 1e-4
    assert cfg["data"]["domains"] == "ab" and cfg["run"]["storage_path"] == str(tmp_path.resolve())
    for args, words in ((["--set", "model.arch=vgg"], "model.arch must be one of"),
                        (["--set", "train.stpes=3"], "unknown config key(s) in 'train': stpes"),
                        (["--set", "data.domains=c"], "data.domains must be a, b or ab")):
        assert job.main(args + ["--print-config"]) == 2
        assert words in capsys.readouterr().err
    assert job.main(["--data-root", str(tmp_path), "--storage-path", str(tmp_path)]) == 2  # before Ray starts
    assert "no Parquet files for domain(s) a" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ddp_workers_checkpoint_report_and_resume(ray_local, tmp_path, capsys):
    from data_prep.synthetic import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, n=40, size=64)
    base = ["--data-root", str(data), "--storage-path", str(tmp_path / "runs"), "--name", "seg", "--workers", "2",
            "--domains", "ab", "--set", "run.log_every=2", "--set", "run.checkpoint_every=2",
            "--set", "data.eval_images=4", "--set", "train.batch_size=2", "--set", "model.width=16"]
    assert job.main(base + ["--steps", "4"]) == 0
    run = tmp_path / "runs" / "seg"
    assert sorted(p.name for p in run.glob("checkpoint_step*")) == [f"checkpoint_step0000000{i}" for i in (2, 4)]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # rank 0 writes, once per log
    report = json.loads((run / "eval.json").read_text())
    assert report["images"] == 8 and {"a/recall", "b/recall", "a/mask_ap"} <= set(report)
    seg = InstanceSegmenter.from_file(run / "checkpoint_step00000004", category="rectangle")
    assert seg.classes == ["__background__", "ellipse", "rectangle"] and seg.width == 16
    first = torch.load(run / "checkpoint_step00000004" / "training.pt", weights_only=True)
    assert first["step"] == 4 and first["optimizer"]["state"]

    assert job.main(base + ["--steps", "6"]) == 0  # the same run: resumes from step 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    second = torch.load(run / "checkpoint_step00000006" / "training.pt", weights_only=True)
    assert second["step"] == 6 and second["epoch"] == first["epoch"] == 0
    assert second["in_epoch"] == first["in_epoch"] + 2  # the epoch went on where it stopped
    assert "checkpoint_step00000006" in capsys.readouterr().out
