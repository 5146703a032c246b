"""Ray Train for the instance segmenter (jobs/train_segmenter.py): the config, the run folder, generated data when
none is given, the TorchTrainer over DDP workers, then the test split's metrics of the final checkpoint.

    cfg = load_config(None, {"data.root": "/tmp/synth64", "train.steps": 50}, [])
    run(cfg)                        # Ray Train, DDP over run.workers; local=True: one process (segment_train)
    build_trainer(cfg).fit()        # the TorchTrainer alone (Ray initialised)

The loop is instagan.segment_train.run_loop, the one `--local` runs; a worker differs in where rows come from (its
shard of one Ray dataset holding the split's rows of every trained domain, each with its class label), the model
(DDP through `ray.train.torch.prepare_model`) and where checkpoints go (`ray.train.report`, every rank at the same
steps, the checkpoint folder from rank 0: segmenter.pt, training.pt, config.json). A new fit with the same run
name and storage path resumes from the latest checkpoint, skipping the batches of its epoch already trained on.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from instagan.segment_train import (TRAINING_FILE, Progress, SegmentConfig, class_names, evaluate_segmenter,
                                    make_optimizer, read_checkpoint, run_loop, sample_rng, to_sample, train_local,
                                    write_checkpoint)
from instagan.storage import write_text

SYNTHETIC = {"n": 600, "size": 64, "split": "train"}  # generated when data.root is empty: 540 train, 60 test


def load_config(path: Path | None, shortcuts: dict, overrides: list[str]) -> SegmentConfig:
    """The file's sections (defaults without one), then shortcut flags, then --set items; the storage path made
    absolute. Raises ValueError naming a bad key or value."""
    from instagan.distributed.launch import apply_overrides, read_config_file

    values = read_config_file(path) if path is not None else {}
    return apply_overrides(SegmentConfig.from_dict(values), shortcuts, overrides)


def run_folder(cfg: SegmentConfig) -> str:
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def synthetic_data(cfg: SegmentConfig) -> SegmentConfig:
    """With data.root empty, generate (or reuse) <run folder>/data, the ellipses/rectangles set, and use it."""
    if cfg.data.root:
        return cfg
    from data_prep.synthetic import write_synthetic

    out = Path(run_folder(cfg)) / "data"
    if not (out / "metadata.json").is_file():
        t0 = time.perf_counter()
        write_synthetic(out, n=SYNTHETIC["n"], size=SYNTHETIC["size"], workers=min(4, os.cpu_count() or 1))
        print(f"[segment] generated {SYNTHETIC['n']} images per domain in {time.perf_counter() - t0:.1f} s: {out}")
    return cfg.replace(**{"data.root": str(out), "data.split": SYNTHETIC["split"]})


def data_problem(cfg: SegmentConfig) -> str | None:
    """Why cfg.data cannot be trained on, before Ray starts (local paths only)."""
    root, d = cfg.data.root, cfg.data
    if not root or "://" in root:
        return None
    missing = [x for x in d.domains if not any((Path(root) / d.split / x).glob("part-*.parquet"))]
    if missing:
        return (f"data.root {root} has no Parquet files for domain(s) {', '.join(missing)} of split {d.split!r} "
                f"(expected {root}/{d.split}/<domain>/part-*.parquet, written by data_prep)")
    return None


# ---- driver side -------------------------------------------------------------------------------------------------

def datasets(cfg: SegmentConfig) -> dict:
    """{"train": one Ray dataset}: the split's rows of every trained domain with a `label` column (1 + the domain's
    position in data.domains), read once into the object store (small splits; epochs then start at once)."""
    import pyarrow as pa
    import ray.data

    from instagan.data import COLUMNS

    def labelled(label: int):
        def add(batch: pa.Table) -> pa.Table:
            return batch.append_column("label", pa.array([label] * batch.num_rows, pa.int64()))
        return add

    parts = [ray.data.read_parquet(f"{cfg.data.root.rstrip('/')}/{cfg.data.split}/{d}").select_columns(COLUMNS)
             .map_batches(labelled(1 + i), batch_format="pyarrow") for i, d in enumerate(cfg.data.domains)]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds.context.execution_options.preserve_order = True
    return {"train": ds.materialize()}


def build_trainer(cfg: SegmentConfig, loop_config: dict | None = None):
    """The TorchTrainer of `cfg` (Ray initialised); loop_config: extra keys for the worker (tests)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from instagan.distributed.train import data_config

    r = cfg.run
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "classes": class_names(cfg.data.root, cfg.data.domains),
                           **(loop_config or {})},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.use_gpu, resources_per_worker=resources),
        datasets=datasets(cfg), dataset_config=data_config(),
        run_config=RunConfig(name=r.name, storage_path=r.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep),
                             failure_config=FailureConfig(max_failures=r.max_failures)))


def run(cfg: SegmentConfig, address: str | None = None, local: bool = False) -> int:
    """Train `cfg` (Ray Train, or with `local` in this process), evaluate the final checkpoint on the test split and
    print where to look. -> exit status."""
    launched = time.time()
    problem = data_problem(cfg)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    cfg = synthetic_data(cfg)
    folder = run_folder(cfg)
    write_text(f"{folder}/config.json", cfg.to_json() + "\n")
    print(f"[segment] run folder: {folder}", flush=True)
    if local:
        train_local(cfg, folder)
        found = sorted(Path(folder).glob("checkpoint_step*"))
        print(f"[segment] done in {time.time() - launched:.0f} s without Ray; checkpoint: {found[-1]}")
        return 0
    from ray.train import TrainingFailedError

    from instagan.distributed.launch import init_ray

    init_ray(address, cfg.run.workers * cfg.run.cpus_per_worker, dashboard=False)
    try:
        result = build_trainer(cfg).fit()
    except TrainingFailedError as err:
        print(f"error: training failed: {err}", file=sys.stderr)
        return 1
    ckpt = result.checkpoint.path if result.checkpoint else None
    print(f"[segment] done in {time.time() - launched:.0f} s; checkpoint: {ckpt}")
    print(f"[segment] final metrics: {json.dumps(result.metrics, sort_keys=True)}")
    if ckpt and cfg.data.test_split and "://" not in folder:
        from instagan.segment import InstanceSegmenter

        seg = InstanceSegmenter.from_file(ckpt, score_threshold=cfg.train.score_threshold, category=1)
        report = evaluate_segmenter(seg, cfg.data.root, cfg.data.test_split, cfg.data.domains, cfg.data.eval_images)
        write_text(f"{folder}/eval.json", json.dumps({"checkpoint": ckpt, **report}, indent=2) + "\n")
        print(f"[segment] test split ({cfg.data.test_split}): {json.dumps(report)}")
    print(f"[segment] use it: jobs/translate.py --masks predict --segmenter {ckpt}")
    return 0


# ---- worker side -------------------------------------------------------------------------------------------------

def _shard_batches(shard, cfg: SegmentConfig, epoch: int, rank: int, skip: int) -> Iterator[tuple[list, list]]:
    """One epoch of this rank's shard in full batches (every rank gets as many: Ray splits rows equally), in a
    seeded local shuffle; the first `skip` batches are passed over undecoded (resume)."""
    from instagan.data import read_sample

    t = cfg.train
    rng = sample_rng(t.seed, epoch, rank)
    for b, batch in enumerate(shard.iter_batches(batch_size=t.batch_size, batch_format="numpy", drop_last=True,
                                                 local_shuffle_buffer_size=256,
                                                 local_shuffle_seed=t.seed * 1000 + epoch * 10 + rank)):
        flips = [t.flip and rng.random() < 0.5 for _ in range(t.batch_size)]
        if b < skip:
            continue
        rows = [{k: batch[k][i] for k in batch} for i in range(t.batch_size)]
        samples = [to_sample(*read_sample(row), int(row["label"]), f) for row, f in zip(rows, flips)]
        yield [x for x, _ in samples], [tg for _, tg in samples]


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker: config = {"cfg": SegmentConfig.to_dict(), "classes": [class names]}."""
    import ray.train
    import ray.train.torch

    from instagan.distributed.train import rank_world
    from instagan.loop import mean_over_ranks
    from instagan.segment_train import build_for_training

    cfg = SegmentConfig.from_dict(config["cfg"])
    rank, _ = rank_world()
    device = ray.train.torch.get_device()
    seg = build_for_training(cfg, config["classes"])
    seg.model.to(device)
    seg.device = device
    opt = make_optimizer(seg.model, cfg.train)
    progress = Progress()
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            if (Path(d) / TRAINING_FILE).is_file():
                progress = read_checkpoint(Path(d), seg, opt)
    model = ray.train.torch.prepare_model(seg.model)  # DDP over the workers (gloo on CPU)
    shard = ray.train.get_dataset_shard("train")
    folder = Path(run_folder(cfg)) if "://" not in cfg.run.storage_path else None

    def report(metrics: dict, checkpoint: bool) -> None:
        if rank == 0 and folder is not None:
            with open(folder / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            print(f"[segment] step {metrics['step']}/{cfg.train.steps} loss {metrics['loss/total']:.3f} "
                  f"({metrics['time/step_s']:.2f} s/step)", flush=True)
        if not checkpoint or rank != 0:
            ray.train.report(metrics)  # a barrier: every rank reports at the same steps
        else:
            with tempfile.TemporaryDirectory(prefix="instagan-seg-") as d:
                write_checkpoint(Path(d), seg, opt, progress, cfg)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"checkpoint_step{progress.step:08d}")

    run_loop(cfg, seg, model, opt, progress, lambda epoch, skip: _shard_batches(shard, cfg, epoch, rank, skip),
             report, lambda m: mean_over_ranks(m, device))
