"""jobs/train.py: command line, config files and overrides, and a real `ray job submit` to a local 2-node cluster.

    .venv/bin/python -m pytest tests/test_train_job.py -q                 # about 1-2 minutes (the job is slow)
    .venv/bin/python -m pytest tests/test_train_job.py -q -m "not slow"   # command line only, a few seconds
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from instagan.config import Config  # noqa: E402
from instagan.distributed import launch  # noqa: E402
from jobs import train as job  # noqa: E402

TINY_JOB = {  # a job that starts and ends quickly: width 4 networks on 32x32 images, 4 steps
    "model": {"ngf": 4, "ndf": 4, "n_blocks": 1},
    "train": {"batch_size": 2, "pool_size": 4},
    "data": {"size": 32, "load_size": 36},
    "run": {"name": "job", "workers": 2, "cpus_per_worker": 0.5, "max_steps": 4, "log_every": 2,
            "image_every": 2, "checkpoint_every": 2, "num_to_keep": 1, "max_failures": 0},
}


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=client_env(), cwd="/")


# ---- command line and config ----------------------------------------------------------------------------------

def test_help_runs_without_ray():
    out = run_script("--help")
    assert out.returncode == 0, out.stderr
    for flag in ("--config", "--set", "--name", "--storage-path", "--workers", "--address", "--max-steps"):
        assert flag in out.stdout
    assert "ray job submit" in out.stdout


@pytest.mark.parametrize("args, words", [
    (["--set", "model.ngff=8"], ["unknown config key", "ngff"]),
    (["--set", "modle.ngf=8"], ["unknown config key", "modle.ngf"]),
    (["--set", "train.batch_size=two"], ["train.batch_size", "int"]),
    (["--set", "run.workers"], ["SECTION.KEY=VALUE"]),
])
def test_bad_overrides_are_clear_errors(args, words):
    out = run_script(*args, "--print-config")
    assert out.returncode == 2
    assert all(w in out.stderr for w in words), out.stderr


@pytest.mark.parametrize("args, words", [
    (["--data-root", "/nonexistent/set"], ["data.root /nonexistent/set has no Parquet files", "a, b"]),
    (["--set", "train.lr_g=nan"], ["'train.lr_g' must be a finite number"]),
    (["--set", "run.name=.."], ["run.name must be a folder name inside the storage path"]),
])
def test_unusable_settings_stop_before_ray_starts(args, words):
    t0 = time.perf_counter()
    out = run_script(*args)
    assert out.returncode == 2 and time.perf_counter() - t0 < 30
    assert all(w in out.stderr for w in words) and "Ray" not in out.stdout, (out.stdout, out.stderr)


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"ngf": 8}, "trian": {"epochs": 1}}))
    out = run_script("--config", str(bad), "--print-config")
    assert out.returncode == 2 and "trian" in out.stderr


def test_file_then_shortcuts_then_set(tmp_path, capsys):
    path = tmp_path / "c.json"  # JSON is read like YAML
    path.write_text(json.dumps({"model": {"ngf": 8}, "train": {"lr_g": 0.1}, "run": {"workers": 1}}))
    rc = job.main(["--config", str(path), "--workers", "3", "--name", "x", "--storage-path", "rel/runs",
                   "--set", "train.lr_g=1e-3", "--set", "run.use_gpu=true", "--print-config"])
    assert rc == 0
    cfg = Config.from_dict(json.loads(capsys.readouterr().out))
    assert cfg.model.ngf == 8 and cfg.model.ndf == 64  # keys left out take the paper defaults
    assert cfg.train.lr_g == 1e-3 and cfg.run.workers == 3 and cfg.run.use_gpu and cfg.run.name == "x"
    assert Path(cfg.run.storage_path).is_absolute() and cfg.run.storage_path.endswith("rel/runs")


def test_embedded_default_is_configs_tiny_synthetic(capsys):
    from_file = Config.from_dict(yaml.safe_load((ROOT / "configs" / "tiny_synthetic.yaml").read_text()))
    assert Config.from_dict(launch.DEFAULT) == from_file
    assert job.main(["--print-config"]) == 0
    resolved = Config.from_dict(json.loads(capsys.readouterr().out))
    assert resolved.run.storage_path == str(Path("~/ray_results").expanduser())  # Ray's default, made explicit
    assert resolved.run.workers == 2 and resolved.run.cpus_per_worker == 0.5 and resolved.data.root == ""


def test_paper_config():
    cfg = Config.from_dict(yaml.safe_load((ROOT / "configs" / "coco_sheep2giraffe.yaml").read_text()))
    assert (cfg.model.ngf, cfg.model.ndf, cfg.model.n_blocks) == (64, 64, 9)
    assert (cfg.data.size, cfg.data.load_size) == (200, 220)
    assert (cfg.train.epochs, cfg.train.epochs_decay, cfg.train.lr_g, cfg.train.lr_d) == (100, 100, 2e-4, 1e-4)
    assert (cfg.loss.lambda_cyc, cfg.loss.lambda_idt, cfg.loss.lambda_ctx) == (10, 10, 10)
    assert cfg.run.use_gpu


# ---- ray job submit to a local multi-node cluster (cluster/local_cluster.py) ----------------------------------

@pytest.mark.slow
def test_ray_job_submit_to_a_local_cluster(tmp_path):
    from cluster import local_cluster

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_JOB))
    storage = tmp_path / "runs"
    base = tmp_path / "cluster"
    try:
        state = local_cluster.start(base, workers=1, cpus_per_node=2, object_store_mb=256)
        submitted = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", state["dashboard_url"],
             "--submission-id", "train-1", "--working-dir", str(ROOT), "--",
             "python", "jobs/train.py", "--config", str(config), "--storage-path", str(storage),
             "--synthetic-n", "12"],
            capture_output=True, text=True, timeout=400, env=client_env(), cwd=ROOT)
        logs = submitted.stdout + submitted.stderr
        assert submitted.returncode == 0, logs[-5000:]
        job_info = local_cluster.http_get(f"{state['dashboard_url']}/api/jobs/train-1")
        assert job_info["status"] == "SUCCEEDED", job_info
        # Resubmitted with --verbose and 2 more steps: it resumes, and Ray Train's per-report logs come back.
        again = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", state["dashboard_url"],
             "--submission-id", "train-2", "--working-dir", str(ROOT), "--",
             "python", "jobs/train.py", "--config", str(config), "--storage-path", str(storage),
             "--max-steps", "6", "--verbose"],
            capture_output=True, text=True, timeout=400, env=client_env(), cwd=ROOT)
        verbose_logs = again.stdout + again.stderr
        assert again.returncode == 0, verbose_logs[-5000:]
    finally:
        local_cluster.stop(base)
    assert local_cluster.leftover_pids(base) == []
    run_dir = storage / "job"
    assert "[train] checkpoint:" in logs and "[train] TensorBoard:" in logs
    # One progress line per run.log_every steps from rank 0, and no per-report dumps unless --verbose.
    progress = [ln.split("[instagan] ", 1)[1] for ln in logs.splitlines() if "[instagan] step " in ln]
    assert len(set(progress)) == len(progress), progress  # each once (Train's patched print showed lines twice)
    steps = [int(p.split(" ")[1].split("/")[0]) for p in progress]
    assert steps == sorted(set(steps)) and {2, 4} <= set(steps), progress  # log_every 2, and each epoch's end
    assert progress[0].startswith("step 2/4 (50%) | ") and progress[-1].startswith("step 4/4 (100%) | "), progress
    assert all(" samples/s | G " in p and " elapsed | ETA " in p for p in progress), progress
    assert "TrainingReport(" not in logs and "TrainingReport(" in verbose_logs
    assert "[instagan] step 6/6 (100%)" in verbose_logs and "resumed from" in verbose_logs
    (ckpt,) = run_dir.glob("checkpoint_step*")  # num_to_keep 1: the resumed run's last
    assert ckpt.name.startswith("checkpoint_step00000006_")
    assert {"state.pt", "config.json", "progress.json", "pools_rank1.pt"} <= {p.name for p in ckpt.iterdir()}
    resolved = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    assert resolved.data.root == str(run_dir / "data") and resolved.run.storage_path == str(storage)
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["step_000002.png", "step_000004.png",
                                                                           "step_000006.png"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    from instagan import checkpoint

    cfg, payload = checkpoint.load(ckpt)
    assert payload["step"] == 6 and cfg.model.ngf == 4
