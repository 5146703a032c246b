"""jobs/tune.py: search-space parsing and errors, and a real 2-trial Ray Tune sweep in which ASHA stops a trial.

    .venv/bin/python -m pytest tests/test_tune.py -q                  # about 2 minutes on 2 cores (Ray: slow)
    .venv/bin/python -m pytest tests/test_tune.py -q -m "not slow"    # parsing only, seconds

The sweep: two trials in grid order, a sane one (lr_g 2e-4) and one whose generator lr of 1.0 wrecks its outputs
at the first step; one trial at a time, ASHA with a rung at step 2 and reduction factor 2, so the second trial
falls below the first's value at that rung and is stopped there, while the first runs its 6 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from instagan.distributed import sweep
from jobs import tune as job

MAX_STEPS = 6
SWEEP = {
    "space": {"train.lr_g": {"grid": [2.0e-4, 1.0]}, "loss.lambda_ctx": {"choice": [10.0]}},
    "model": {"ngf": 8, "ndf": 8, "n_blocks": 1},
    "train": {"batch_size": 2, "pool_size": 4, "epochs": 1, "epochs_decay": 9},
    "data": {"root": "", "size": 32, "load_size": 36},
    "run": {"name": "sweep", "workers": 2, "cpus_per_worker": 0.5, "max_steps": MAX_STEPS, "log_every": 2,
            "image_every": 0, "checkpoint_every": 4, "num_to_keep": 1, "max_failures": 0, "val_every": 2,
            "val_images": 2},
}


def write_config(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# ---- command line and search space ------------------------------------------------------------------------------

def test_search_flags_and_files_merge(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("loss.lambda_idt: {uniform: [0, 5]}\ntrain.lr_g: {loguniform: [1.0e-5, 1.0e-3]}\n")
    cfg, space = sweep.load_sweep(write_config(tmp_path, SWEEP), space_file, ["train.lr_d=choice:1e-4,2e-4"], {},
                                  ["run.val_every=3"])
    assert space == {"train.lr_g": {"loguniform": [1e-5, 1e-3]}, "loss.lambda_ctx": {"choice": [10.0]},
                     "loss.lambda_idt": {"uniform": [0, 5]}, "train.lr_d": {"choice": [1e-4, 2e-4]}}
    assert cfg.run.val_every == 3 and Path(cfg.run.storage_path).is_absolute()
    opts = sweep.sweep_options(cfg)
    assert (opts["grace_period"], opts["max_t"], opts["metric"], opts["mode"]) == (3, MAX_STEPS, "val/score", "max")


@pytest.mark.parametrize("search, words", [
    ("loss.lambda_cyc=logunif:1,30", ["unknown distribution", "logunif"]),
    ("loss.lambdacyc=uniform:1,30", ["loss.lambdacyc", "unknown config key"]),
    ("loss.lambda_cyc=loguniform:0,30", ["loss.lambda_cyc", "0 < lo < hi"]),
    ("loss.lambda_cyc=uniform:1", ["loss.lambda_cyc", "list of 2"]),
    ("train.batch_size=choice:2,two", ["train.batch_size", "int"]),
    ("loss.lambda_cyc", ["KEY=DIST"]),
])
def test_bad_space_is_a_clear_error(tmp_path, capsys, search, words):
    assert job.main(["--config", str(write_config(tmp_path, SWEEP)), "--search", search]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_sweep_needs_validation_and_steps(tmp_path, capsys):
    config = str(write_config(tmp_path, SWEEP))
    assert job.main(["--config", config, "--set", "run.val_every=0"]) == 2
    assert "run.val_every > 0" in capsys.readouterr().err
    assert job.main(["--config", config, "--set", "run.max_steps=0"]) == 2
    assert "--max-t" in capsys.readouterr().err
    assert job.main(["--config", config, "--name", "nothing_here", "--storage-path", str(tmp_path), "--resume"]) == 2
    assert "sweep.json" in capsys.readouterr().err


def test_default_config_parses():
    cfg, space = sweep.load_sweep(job.DEFAULT_CONFIG, None, [], {}, [])
    assert {"loss.lambda_cyc", "loss.lambda_idt", "loss.lambda_ctx", "train.lr_g", "train.lr_d"} == set(space)
    assert cfg.run.val_every > 0 and cfg.run.max_steps > 0


# ---- a real sweep -----------------------------------------------------------------------------------------------

def last_result(trial_dir: Path) -> dict:
    lines = (trial_dir / "result.json").read_text().splitlines()
    return json.loads(lines[-1])


@pytest.mark.slow
def test_two_trial_sweep_asha_stops_the_worse_one(ray_local, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ["--config", str(write_config(tmp_path, SWEEP)), "--storage-path", str(tmp_path / "runs"),
            "--num-samples", "1", "--max-concurrent", "1", "--grace-period", "2", "--reduction-factor", "2",
            "--synthetic-n", "20"]
    assert job.main(argv) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "sweep"
    trials = sorted(folder.glob("trial_*"))
    assert len(trials) == 2, trials
    results = {json.loads((t / "params.json").read_text())["train.lr_g"]: (t, last_result(t)) for t in trials}
    good, bad = results[2e-4], results[1.0]
    assert good[1]["step"] == MAX_STEPS  # ran to the end
    assert bad[1]["step"] < MAX_STEPS  # ASHA stopped it at its first rung
    assert bad[1]["val/score"] < good[1]["val/score"]
    # every result Tune saw came from a validation step
    for t, _ in results.values():
        for line in (t / "result.json").read_text().splitlines():
            r = json.loads(line)
            assert r["step"] % 2 == 0 and "val/bg_err_ab" in r and "val/inst_ba" in r, r

    # the ranked table and the best trial, printed and as JSON
    assert "stopped early" in out and "completed" in out
    best = json.loads(next(line for line in out.splitlines() if line.startswith("best: "))[len("best: "):])
    assert best["params"] == {"train.lr_g": 2e-4, "loss.lambda_ctx": 10.0}
    assert best["trial"] == good[0].name and best["step"] == MAX_STEPS
    assert best["config"]["train"]["lr_g"] == 2e-4 and best["config"]["model"]["ngf"] == 8
    ckpt = Path(best["checkpoint"])
    assert ckpt.parent == good[0] / "train" and (ckpt / "state.pt").is_file(), ckpt
    assert json.loads((folder / "best.json").read_text())["checkpoint"] == best["checkpoint"]

    # TensorBoard per trial, with the validation curve
    for t, _ in results.values():
        events = EventAccumulator(str(t / "train" / "tensorboard"))
        events.Reload()
        assert "val/score" in events.Tags()["scalars"], t
    assert sorted(p.name for p in (folder / "hparams").iterdir()) == sorted(t.name for t in trials)  # HPARAMS tab

    # restoring the finished sweep re-runs nothing and ranks the same trials
    assert job.main(["--storage-path", str(tmp_path / "runs"), "--name", "sweep", "--resume"]) == 0
    again = capsys.readouterr().out
    assert f"best trial: {good[0].name}" in again and "stopped early" in again
    assert sorted(folder.glob("trial_*")) == trials and last_result(bad[0])["step"] == bad[1]["step"]


def test_hparams_view_holds_each_trial_with_its_values_and_metric(tmp_path):
    """write_hparams: TensorBoard's HParams plugin data per trial (values and last metric), read back with
    TensorBoard's own reader; a trial without the metric (an error) is left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from instagan.distributed.sweep import write_hparams

    rows = [{"trial": "trial_1", "params": {"train.lr_g": 2e-4, "model.paint": "extend"}, "metric": 0.7, "step": 8},
            {"trial": "trial_2", "params": {"train.lr_g": 1.0, "model.paint": "residual"}, "metric": 0.2, "step": 2},
            {"trial": "trial_3", "params": {"train.lr_g": 5e-4, "model.paint": "direct"}, "metric": None, "step": 0}]
    root = write_hparams(tmp_path, rows, "val/score")
    assert sorted(p.name for p in root.iterdir()) == ["trial_1", "trial_2"]
    for r in rows[:2]:
        events = EventAccumulator(str(root / r["trial"]))
        events.Reload()
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hp = start.session_start_info.hparams
        assert hp["train.lr_g"].number_value == r["params"]["train.lr_g"]
        assert hp["model.paint"].string_value == r["params"]["model.paint"]
        assert [s.value for s in events.Scalars("hparam/val/score")] == [pytest.approx(r["metric"])]
