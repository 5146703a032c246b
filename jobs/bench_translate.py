"""Benchmark: images/s of the Ray Data translate job (jobs/translate.py) against the bare Translator loop, same rows.

    python jobs/bench_translate.py                                   # paper generator (ngf 64, 9 blocks), 200x200
    python jobs/bench_translate.py --ngf 16 --n-blocks 3 --n 64      # a small generator: overheads weigh more

Prints one JSON object. Rows: --n generated 200x200 images (data_prep synthetic, 1-6 instances each), translated
a2b by an untrained generator of the given width (speed does not depend on the weights) at the model's size.
- bare: Translator.translate_arrays over the decoded rows in batches of --batch-size, torch threads --threads;
  run before and after the jobs (the machine may be shared) and averaged. bare_rows adds what each actor also does
  per row: decode the PNG and RLE masks, encode the output PNG and masks (jobs.translate.translate_rows).
- job: translate_collection with one actor of --threads CPUs and threads, on the first --n-small rows and then on
  all --n rows (fresh output folders; Ray started once, its start-up reported as ray_init_s). with_startup =
  n / wall of the full run; steady = (n - n_small) / (wall_full - wall_small), the rate once actors run, and
  startup_s = wall_small - n_small / steady, the fixed cost of one job (planning, actor start, checkpoint load).
- with --segmenter FILE (a jobs/train_segmenter.py checkpoint or a torchvision Mask R-CNN file; `r50-untrained`
  builds torchvision's maskrcnn_resnet50_fpn with random weights, for its speed at 800 px): segment_images_per_s is
  the segmenter alone (InstanceSegmenter.predict in batches of --batch-size), bare_rows_predict_images_per_s what an
  actor of `jobs/translate.py --masks predict` does per row (segment, then translate the predicted masks), and
  predict_vs_given = that over bare_rows_images_per_s. two_stage_bound_images_per_s estimates separate segmenter and
  translator actors of --threads / 2 CPUs each, perfectly overlapped: 1 / max(t_segment, t_translate), each timed
  at --threads / 2 threads (with --threads 2 or more). --no-job skips the Ray runs.
- with --segmenter and --stages: the Ray job with --masks predict on the same rows twice, with the same CPUs:
  one stage (one actor of --threads CPUs segments and translates) and two stages (a segmenter actor and a
  translate actor of --threads / 2 CPUs each, jobs/translate.py --segment-actors 1); each on the first --n-small
  rows and then on all --n rows, reported as steady images/s like the job above (stages_*).

    python jobs/bench_translate.py --segmenter /tmp/seg/run/checkpoint_step00000200 --no-job   # the small one
    python jobs/bench_translate.py --segmenter r50-untrained --n 8 --no-job                    # Mask R-CNN R50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def bare_loop(tr, items: list, batch_size: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(items), batch_size):
        tr.translate_arrays(items[start:start + batch_size], batch_size=batch_size)
    return len(items) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48, help="images in the full run")
    p.add_argument("--n-small", type=int, default=0, help="images in the small run (default n / 4)")
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--n-blocks", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch threads (bare loop) = CPUs and threads of the actor")
    p.add_argument("--ins-per", type=int, default=2)
    p.add_argument("--segmenter", help="also time --masks predict with this segmenter file (or r50-untrained)")
    p.add_argument("--category", help="the segmenter's category (default: its only one; r50-untrained: sheep)")
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--no-job", action="store_true", help="time the bare loops only (no Ray)")
    p.add_argument("--stages", action="store_true", help="with --segmenter: one stage against two in the Ray job")
    args = p.parse_args(argv)
    n_small = args.n_small or max(1, args.n // 4)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import pyarrow.parquet as pq
    import torch

    from data_prep.synthetic import write_synthetic
    from instagan import checkpoint
    from instagan.config import Config
    from instagan.data import read_sample
    from instagan.infer import Translator
    from instagan.train import TrainState
    from instagan.distributed import translate as job
    from instagan.inputs import Source

    tmp = Path(tempfile.mkdtemp(prefix="bench_translate_"))
    write_synthetic(tmp / "data", n=args.n, size=args.size, test_fraction=0.0, workers=min(2, os.cpu_count() or 1))
    table = pq.read_table(sorted((tmp / "data" / "train" / "a").glob("*.parquet")))
    pq.write_table(table, tmp / "full.parquet")
    pq.write_table(table.slice(0, n_small), tmp / "small.parquet")
    cfg = Config.from_dict({"model": {"ngf": args.ngf, "n_blocks": args.n_blocks},
                            "data": {"size": args.size, "load_size": args.size}})
    ckpt = str(checkpoint.save(TrainState.create(cfg), tmp / "ckpt"))

    torch.set_num_threads(args.threads)
    tr = Translator.from_checkpoint(ckpt, "a2b", ins_max=20, ins_per=args.ins_per)
    rows = [{**r, "source": "", "problems": ""} for r in table.to_pylist()]
    items = [read_sample(r) for r in rows]
    tr.translate_arrays(items[:1])  # first-call set-up (oneDNN primitives) out of the timings
    bare = [bare_loop(tr, items, args.batch_size)]
    t0 = time.perf_counter()
    job.translate_rows(tr, rows, size=None, batch_size=args.batch_size, direction="a2b", checkpoint=ckpt)
    bare_rows = len(rows) / (time.perf_counter() - t0)
    seg_figures = segment_figures(args, tmp, tr, rows, items, ckpt, bare_rows) if args.segmenter else {}
    if args.no_job:
        shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps({"size": args.size, "ngf": args.ngf, "n_blocks": args.n_blocks, "n": args.n,
                          "instances": sum(len(m) for _, m in items), "batch_size": args.batch_size,
                          "threads": args.threads, "bare_images_per_s": round(bare[0], 3),
                          "bare_rows_images_per_s": round(bare_rows, 3), **seg_figures,
                          "loadavg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}))
        return 0

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=max(4, args.threads + 2), log_to_driver=False, include_dashboard=False)  # as jobs/translate.py
    ray_init = time.perf_counter() - t0
    stage_figures = stage_runs(args, tmp, ckpt, seg_figures["segmenter_file"], n_small) if args.stages else {}
    walls = {}
    for name, n in (("small", n_small), ("full", args.n)):
        source = Source("parquet", "a", files=[str(tmp / f"{name}.parquet")])
        t0 = time.perf_counter()
        summary = job.translate_collection(source, ckpt, str(tmp / f"out_{name}"), actors=1,
                                           cpus_per_actor=args.threads, threads=args.threads,
                                           batch_size=args.batch_size, rows_per_file=128)
        walls[name] = time.perf_counter() - t0
        assert summary["written"] == n, summary
    ray.shutdown()
    bare.append(bare_loop(tr, items, args.batch_size))

    shutil.rmtree(tmp, ignore_errors=True)
    bare_mean = sum(bare) / len(bare)
    steady = (args.n - n_small) / (walls["full"] - walls["small"])
    with_startup = args.n / walls["full"]
    print(json.dumps({
        "size": args.size, "ngf": args.ngf, "n_blocks": args.n_blocks, "n": args.n, "n_small": n_small,
        "instances": sum(len(m) for _, m in items), "batch_size": args.batch_size, "threads": args.threads,
        "bare_images_per_s": round(bare_mean, 3), "bare_runs": [round(b, 3) for b in bare],
        "bare_rows_images_per_s": round(bare_rows, 3),
        "job_images_per_s_with_startup": round(with_startup, 3), "job_images_per_s_steady": round(steady, 3),
        "job_startup_s": round(walls["small"] - n_small / steady, 2), "ray_init_s": round(ray_init, 2),
        "job_wall_s": {k: round(v, 2) for k, v in walls.items()},
        "ratio_steady": round(steady / bare_mean, 3), "ratio_with_startup": round(with_startup / bare_mean, 3),
        **seg_figures, **stage_figures,
        "loadavg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "torch": torch.__version__,
    }))
    return 0


def segment_figures(args, tmp: Path, tr, rows: list, items: list, ckpt: str, bare_rows: float) -> dict:
    """The --segmenter figures (module docstring)."""
    import torch

    from instagan.distributed import translate as job
    from instagan.segment import COCO_CATEGORIES, InstanceSegmenter, build_model

    path, category = args.segmenter, args.category
    if path == "r50-untrained":
        seg = InstanceSegmenter(build_model("maskrcnn_resnet50_fpn"), "maskrcnn_resnet50_fpn", COCO_CATEGORIES,
                                category="sheep")
        path, category = str(seg.save(tmp / "r50.pt")), category or "sheep"
    seg = InstanceSegmenter.from_file(path, category=category, score_threshold=args.score_threshold,
                                      batch_size=args.batch_size, max_instances=20)
    images = [img for img, _ in items]
    seg.predict(images[:1])  # first-call set-up out of the timings

    def seg_rate() -> float:
        t0 = time.perf_counter()
        seg.predict(images)
        return len(images) / (time.perf_counter() - t0)

    def tr_rate() -> float:
        return bare_loop(tr, items, args.batch_size)

    segment = seg_rate()
    t0 = time.perf_counter()
    out = job.translate_rows(tr, rows, size=None, batch_size=args.batch_size, direction="a2b", checkpoint=ckpt,
                             segmenter=seg, masks="predict", segmenter_path=path)
    predict = len(rows) / (time.perf_counter() - t0)
    figures = {"segmenter": args.segmenter, "segmenter_file": path, "segmenter_arch": seg.arch,
               "segment_images_per_s": round(segment, 3),
               "bare_rows_predict_images_per_s": round(predict, 3),
               "predict_vs_given": round(predict / bare_rows, 3),
               "predicted_instances": sum(len(r["input_masks"]) for r in out),
               "no_instances_detected": sum(1 for r in out if r["image"] is None)}
    if args.threads >= 2:  # two stages of half the threads each
        half = args.threads // 2
        torch.set_num_threads(half)
        seg_half, tr_half = seg_rate(), tr_rate()
        torch.set_num_threads(args.threads)
        figures.update(two_stage_threads_each=half, segment_images_per_s_half=round(seg_half, 3),
                       translate_images_per_s_half=round(tr_half, 3),
                       two_stage_bound_images_per_s=round(min(seg_half, tr_half), 3))
    return figures


def stage_runs(args, tmp: Path, ckpt: str, segmenter: str, n_small: int) -> dict:
    """The --stages figures (module docstring): one stage against two, same rows, same CPUs."""
    from instagan.distributed import translate as job
    from instagan.inputs import Source

    half = max(0.5, args.threads / 2)
    layouts = {"one": dict(segment_actors=0, cpus_per_actor=args.threads, threads=args.threads),
               "two": dict(segment_actors=1, cpus_per_segment_actor=half, cpus_per_actor=half,
                           threads=max(1, int(half)))}
    out = {}
    for layout, kw in layouts.items():
        walls = {}
        for name, n in (("small", n_small), ("full", args.n)):
            source = Source("parquet", "a", files=[str(tmp / f"{name}.parquet")])
            t0 = time.perf_counter()
            summary = job.translate_collection(source, ckpt, str(tmp / f"stages_{layout}_{name}"), actors=1,
                                               batch_size=args.batch_size, rows_per_file=128, masks="predict",
                                               segmenter=segmenter, category=args.category,
                                               score_threshold=args.score_threshold, **kw)
            walls[name] = time.perf_counter() - t0
            assert summary["written"] + summary["skipped"] == n, summary
        out[f"stages_{layout}_images_per_s_steady"] = round((args.n - n_small) / (walls["full"] - walls["small"]), 3)
        out[f"stages_{layout}_wall_s"] = {k: round(v, 2) for k, v in walls.items()}
    out["stages_two_vs_one"] = round(out["stages_two_images_per_s_steady"] / out["stages_one_images_per_s_steady"],
                                     3)
    return out


if __name__ == "__main__":
    sys.exit(main())
