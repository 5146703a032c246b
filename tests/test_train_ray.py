"""Distributed training on real Ray (no mocks): DDP with uneven instance counts, a killed worker, stop and resume.

    .venv/bin/python -m pytest tests/test_train_ray.py -q        # about 3-6 minutes on 2 cores (Ray tests: slow)

Tiny networks (width 4, one residual block) on 32x32 generated images; two workers at half a CPU each, gloo.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from data_prep.synthetic import write_synthetic
from instagan import checkpoint
from instagan.distributed import launch
from instagan.distributed import train as D
from instagan import loop
from instagan.config import Config
from instagan.synthetic import make_batch
from instagan.train import TrainState, chunk_count, unwrap

TINY = {
    "model": {"ngf": 4, "ndf": 4, "n_blocks": 1},
    "train": {"batch_size": 2, "ins_max": 4, "ins_per": 2, "pool_size": 3, "epochs": 1, "epochs_decay": 9,
              "seed": 1},
    "data": {"size": 32, "load_size": 36},
    "run": {"workers": 2, "cpus_per_worker": 0.5, "log_every": 2, "checkpoint_every": 3, "image_every": 0,
            "num_to_keep": 3, "max_failures": 0},
}
FIT_TIMEOUT_S = 300  # a hang (ranks disagreeing on collectives) fails the test instead of blocking the session
FAIL_AT = 4  # the step after which rank 1 dies once (a checkpoint was reported at step 3)


def params_vector(state: TrainState) -> torch.Tensor:
    """Every parameter of the four networks as one CPU vector (for comparing ranks)."""
    return torch.cat([p.detach().flatten().cpu() for net in state.nets.values() for p in net.parameters()])


def tiny(tmp_path: Path, name: str, **dotted) -> Config:
    cfg = Config.from_dict(TINY).replace(**{"run.name": name, "run.storage_path": str(tmp_path / "runs")})
    return cfg.replace(**dotted) if dotted else cfg


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """18 training images per domain in several files (Ray Data's row order then needs preserve_order to repeat):
    9 per rank, 5 batches of 2 per epoch (the last one holds 1)."""
    root = tmp_path_factory.mktemp("synth")
    meta = write_synthetic(root, n=20, size=36, seed=0, extra=("--shard-mb", "0.02"))
    assert len(list((root / "train" / "a").glob("part-*.parquet"))) > 1, meta
    return str(root)


def fit(loop, cfg: Config, datasets: dict | None = None, extra: dict | None = None):
    """The job's TorchTrainer (instagan.distributed.launch.build_trainer) running `loop`, failing the test if
    fit() does not end in time."""
    trainer = launch.build_trainer(cfg, loop=loop, loop_config=extra, datasets=datasets)
    out: dict = {}

    def target():
        try:
            out["result"] = trainer.fit()
        except BaseException as err:  # reported in the test's thread
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(FIT_TIMEOUT_S)
    assert not thread.is_alive(), f"fit() did not finish in {FIT_TIMEOUT_S} s (a rank hung?)"
    if "error" in out:
        raise out["error"]
    return out["result"]


# ---- two workers, 1 vs 6 instances per image: no hang, identical parameters ------------------------------------

def _uneven_loop(config: dict) -> None:
    import ray.train

    cfg = Config.from_dict(config["cfg"])
    rank, _ = D.rank_world()
    state = D.build_state(cfg, rank)
    ins = (1, 1) if rank == 0 else (6, 6)
    chunks, own = [], []
    for i in range(3):
        a = make_batch("a", 2, 32, ins=ins, start=2 * i)
        b = make_batch("b", 2, 32, ins=ins, start=2 * i + 100)
        own.append(chunk_count(a, b, cfg.train.ins_max, cfg.train.ins_per))
        metrics, _ = loop.step(state, a, b)
        chunks.append(metrics["chunks"])
    sd = {f"{k}.{n}": v.detach().cpu() for k, net in state.nets.items() for n, v in unwrap(net).state_dict().items()}
    torch.save({"params": params_vector(state), "state": sd, "chunks": chunks, "own": own, "step": state.step},
               f"{config['out']}/rank{rank}.pt")
    ray.train.report({"step": state.step})


@pytest.mark.slow
def test_one_vs_six_instances_two_workers_stay_identical(ray_local, tmp_path):
    cfg = tiny(tmp_path, "uneven", **{"train.ins_max": 6})
    fit(_uneven_loop, cfg, extra={"cfg": cfg.to_dict(), "out": str(tmp_path)})
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 3
    assert r0["own"] == [1, 1, 1] and min(r1["own"]) >= 2  # alone, rank 0 would run 1 chunk, rank 1 2 or 3
    assert r0["chunks"] == r1["chunks"] == r1["own"]  # both ran the count agreed across ranks
    assert torch.equal(r0["params"], r1["params"])
    for k in r0["state"]:  # buffers too (spectral-norm vectors)
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert not torch.equal(r0["params"], params_vector(TrainState.create(cfg)))  # training moved them


# ---- a worker dies mid-run: FailureConfig restarts from the last checkpoint ------------------------------------

def _recording_loop(config: dict, fail_at: int = 0) -> None:
    """The real worker loop; rank 0 appends every step it takes to <run folder>/steps.txt. With fail_at, rank 1
    dies (once per run folder) right after that step."""
    run_dir = Path(config["run"]["storage_path"]) / config["run"]["name"]
    marker = run_dir / "rank1_died"

    def on_step(state, rank):
        if rank == 0:
            with open(run_dir / "steps.txt", "a") as f:
                f.write(f"{state.step}\n")
        if fail_at and rank == 1 and state.step == fail_at and not marker.exists():
            marker.touch()
            time.sleep(5)  # Ray registers the step-3 checkpoint once it has polled every rank's report (every 2 s)
            os._exit(1)

    D.train_loop_per_worker(config, on_step=on_step)


def _failing_loop(config: dict) -> None:
    _recording_loop(config, fail_at=FAIL_AT)


def steps_taken(cfg: Config) -> list[int]:
    return [int(s) for s in (Path(cfg.run.storage_path) / cfg.run.name / "steps.txt").read_text().split()]


@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint(ray_local, synth, tmp_path):
    cfg = tiny(tmp_path, "killed", **{"run.max_steps": 8, "run.max_failures": 1, "data.root": synth})
    result = fit(_failing_loop, cfg, datasets=D.datasets(cfg))
    run_dir = tmp_path / "runs" / "killed"
    assert (run_dir / "rank1_died").exists()
    steps = steps_taken(cfg)
    assert steps[0] == 1 and steps[-1] == 8
    assert len(steps) > 8  # some steps ran twice: the run restarted
    back = max(prev - nxt + 1 for prev, nxt in zip(steps, steps[1:]))
    assert 0 < back <= cfg.run.checkpoint_every, steps  # never more than one checkpoint interval lost
    assert result.checkpoint is not None
    _, payload = checkpoint.load(result.checkpoint.path)
    assert payload["step"] == 8 and result.metrics["step"] == 8


# ---- stop and re-submit: the resumed run takes the same steps as an uninterrupted one --------------------------

@pytest.mark.slow
def test_stop_and_resubmit_continues_like_an_uninterrupted_run(ray_local, synth, tmp_path):
    def run(name, steps):
        cfg = tiny(tmp_path, name, **{"run.max_steps": steps, "data.root": synth})
        return cfg, fit(_recording_loop, cfg, D.datasets(cfg))

    # 5 batches per epoch: stopping at step 4 resumes mid-epoch; step 7 is past an epoch end (lr decays there)
    cfg, first = run("resumed", 4)
    assert first.metrics["step"] == 4
    _, second = run("resumed", 7)
    assert steps_taken(cfg) == [1, 2, 3, 4, 5, 6, 7]  # the second fit started at step 5
    cfg, straight = run("straight", 7)
    assert steps_taken(cfg) == [1, 2, 3, 4, 5, 6, 7]
    assert second.metrics["step"] == straight.metrics["step"] == 7
    assert second.metrics["epoch"] == straight.metrics["epoch"] == 1
    losses = {k: v for k, v in straight.metrics.items() if k.startswith(("loss/", "lr/"))}
    assert len(losses) > 10 and {k: second.metrics[k] for k in losses} == pytest.approx(losses, rel=1e-5, abs=1e-6)
    _, res = checkpoint.load(second.checkpoint.path)
    _, ref = checkpoint.load(straight.checkpoint.path)
    assert res["step"] == ref["step"] == 7 and res["epoch"] == ref["epoch"] == 1
    assert res["sched_g"] == ref["sched_g"]
    for net in ("G_ab", "G_ba", "D_a", "D_b"):
        for k in ref[net]:
            torch.testing.assert_close(res[net][k], ref[net][k], rtol=1e-5, atol=1e-6, msg=f"{net}.{k}")
    for opt in ("opt_g", "opt_d"):
        for i, s in ref[opt]["state"].items():
            torch.testing.assert_close(res[opt]["state"][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    for r in ("pool_a", "pool_b"):
        assert len(res[r]["images"]) == len(ref[r]["images"])
    pools = [torch.load(Path(c.checkpoint.path) / "pools_rank1.pt", weights_only=True) for c in (second, straight)]
    assert len(pools[0]["pool_a"]["images"]) == len(pools[1]["pool_a"]["images"])
    for x, y in zip(pools[0]["pool_b"]["images"], pools[1]["pool_b"]["images"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
