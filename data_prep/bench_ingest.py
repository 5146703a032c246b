"""Ingest throughput of the Ray Data pipeline: samples/s that iter_pairs delivers to ONE Ray Train worker.

    python -m data_prep synthetic --n 1000 --size 200 --out /tmp/synth200
    python -m data_prep.bench_ingest --root /tmp/synth200 --size 200 --load-size 220 --batch-size 4 --epochs 3

Prints one JSON object. Modes:
    worker      (shipped) ray_datasets -> get_dataset_shard -> iter_pairs: rows stay encoded until the worker
                decodes and augments them.
    ray_decode  (the alternative measured against it) a map_batches stage decodes and resizes to load_size in Ray
                Data tasks; the worker only crops, flips and collates.
    local       local_batches, no Ray: the decode + augment cost alone.
--no-trainer iterates a streaming_split(1) DataIterator in the driver (the object Train hands a worker) instead of
starting a TorchTrainer: about 10 s less start-up, same data path.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def decode_resize(batch: dict, load_size: int) -> dict:
    """map_batches stage of ray_decode mode: encoded rows -> uint8 (n, L, L, 3) images and (K, L, L) uint8 masks."""
    import torch
    from torchvision.transforms.v2 import functional as F

    from instagan.data import read_sample

    imgs, masks = [], []
    for i in range(len(batch["id"])):
        img, m = read_sample({k: batch[k][i] for k in batch})
        x = F.resize(torch.from_numpy(img).permute(2, 0, 1), [load_size, load_size], antialias=True)
        y = F.resize(torch.from_numpy(m.astype(np.uint8)), [load_size, load_size],
                     interpolation=F.InterpolationMode.NEAREST)
        imgs.append(x.permute(1, 2, 0).numpy())
        masks.append(y.numpy())
    out = np.empty(len(masks), dtype=object)
    out[:] = masks
    return {"id": batch["id"], "img": np.stack(imgs), "masks": out}


def run_epochs(shard_a, shard_b, cfg: dict) -> list[dict]:
    """Consume cfg['epochs'] epochs; per epoch: seconds, pairs, samples/s (a and b samples both count)."""
    import random

    from instagan.data import batch_pairs, local_batches, pair_rows
    from instagan.distributed.data import _shard_rows, iter_pairs

    out = []
    for epoch in range(cfg["epochs"]):
        args = (cfg["batch_size"], cfg["size"], cfg["load_size"], True, 0, epoch, cfg["ins_cap"])
        if cfg["mode"] == "worker":
            it = iter_pairs(shard_a, shard_b, *args)
        elif cfg["mode"] == "ray_decode":
            pairs = pair_rows(_shard_rows(shard_a, epoch), _shard_rows(shard_b, epoch + 1), random.Random(epoch))
            it = batch_pairs(pairs, *args, read=lambda r: (r["img"], r["masks"]))
        else:
            it = local_batches(cfg["root"], cfg["split"], *args)
        t0, c0, first, pairs_n = time.perf_counter(), time.process_time(), None, 0
        for ba, _ in it:
            pairs_n += len(ba["id"])
            first = time.perf_counter() - t0 if first is None else first
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        # cpu: this process's CPU seconds per sample (decode, augment, collate, Ray's iterator threads): unlike
        # samples_per_s it hardly moves when other jobs load the machine
        out.append({"epoch": epoch, "seconds": round(sec, 3), "first_batch_s": round(first or 0, 3),
                    "pairs": pairs_n, "samples_per_s": round(2 * pairs_n / sec, 1),
                    "worker_cpu_ms_per_sample": round(1000 * cpu / (2 * pairs_n), 2)})
    return out


def _train_fn(cfg: dict) -> None:
    import ray.train

    res = run_epochs(ray.train.get_dataset_shard("a"), ray.train.get_dataset_shard("b"), cfg)
    Path(cfg["result_file"]).write_text(json.dumps(res))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--load-size", type=int, default=220)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ins-cap", type=int, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--mode", choices=("worker", "ray_decode", "local"), default="worker")
    p.add_argument("--no-trainer", action="store_true")
    p.add_argument("--materialize", action="store_true", help="ray_datasets(..., materialize=True)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to the local Ray instance")
    args = p.parse_args(argv)
    cfg = {k: getattr(args, k) for k in ("root", "split", "size", "load_size", "batch_size", "ins_cap", "epochs",
                                         "mode")}
    t0 = time.perf_counter()
    if args.mode == "local":
        epochs = run_epochs(None, None, cfg)
    else:
        for k, v in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"),
                     ("RAY_DATA_DISABLE_PROGRESS_BARS", "1")):
            os.environ.setdefault(k, v)
        import ray

        from instagan.distributed.data import ray_datasets

        ray.init(num_cpus=args.num_cpus, log_to_driver=False, include_dashboard=False)
        ds = ray_datasets(args.root, args.split, materialize=args.materialize)
        if args.mode == "ray_decode":
            ds = {d: v.map_batches(decode_resize, batch_size=16, fn_kwargs={"load_size": args.load_size})
                  for d, v in ds.items()}
        if args.no_trainer:
            epochs = run_epochs(ds["a"].streaming_split(1, equal=True)[0],
                                ds["b"].streaming_split(1, equal=True)[0], cfg)
        else:
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            with tempfile.TemporaryDirectory() as tmp:
                cfg["result_file"] = str(Path(tmp) / "epochs.json")
                TorchTrainer(_train_fn, train_loop_config=cfg, datasets=ds,
                             scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                                          resources_per_worker={"CPU": 1}),
                             run_config=RunConfig(name="bench_ingest", storage_path=tmp)).fit()
                epochs = json.loads(Path(cfg["result_file"]).read_text())
        ray.shutdown()
    steady = [e["samples_per_s"] for e in epochs[1:]] or [epochs[0]["samples_per_s"]]
    out = {**{k: v for k, v in cfg.items() if k != "result_file"}, "trainer": not args.no_trainer,
           "materialize": args.materialize, "load_avg_1m": round(os.getloadavg()[0], 2),
           "cpus": os.cpu_count(), "epochs_detail": epochs, "first_epoch_samples_per_s": epochs[0]["samples_per_s"],
           "steady_samples_per_s": max(steady), "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
