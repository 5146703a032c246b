"""The GPU figures of the project in one run of the instagan core (no Ray), for a lent or rented GPU machine:

    python jobs/gpu_report.py --out /tmp/gpu --data /data/shp2gir_split [--limit-s 420]

1. peak: a bf16 8192^3 matmul's TFLOP/s on this card (the measured ceiling; MFU is also given against --peak-tflops,
   the datasheet's dense bf16 rate).
2. bench: `python -m instagan.bench` configurations of the paper-size model (ngf 64, 9 blocks) at 200 px, in this
   process one after another (CUDA peak memory is reset per run): lean vs plain memory machinery at batch 8; batch
   1, 8 and 32 with the faster; channels_last; fp32 on TF32; 2, 4 and 8 instances per image (peak memory flat in
   the instance count); train.compile last, if time is left.
3. quality: the best recipe (configs/ablations/instagan.yaml's levers) against the paper's recipe on real photos
   (--data: a data_prep Parquet set with train and test splits), both at paper width, bf16, the same number of
   steps; each checkpoint evaluated on the test split against the floors and on the train split, grids written.
4. segment: images/s of torchvision's Mask R-CNN R50-FPN (random weights: speed does not depend on them) and of
   the paper-size translator at 200 px, batch 8, bf16, and of the two one after the other.

Writes <out>/report.json (every figure), <out>/quality_<recipe>_<split>.png; run folders go to --work. Parts that
fail are recorded with their error and the rest goes on; parts that would not fit in --limit-s are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEST_LEVERS = ("composite", "paint", "sharp", "mask_cond", "d_mask", "paint_init")  # model keys of the best recipe


SMOKE = {"size": 32, "ngf": 8, "ndf": 8, "n_blocks": 1, "batches": (1, 2), "steps": 1, "warmup": 1,
         "matmul": 512}  # --smoke: a CPU check
PAPER = {"size": 200, "ngf": 64, "ndf": 64, "n_blocks": 9, "batches": (1, 8, 32), "steps": 5, "warmup": 2,
         "matmul": 8192}


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def bench_argv(device: str, peak_tflops: float, model: dict, **kw) -> list[str]:
    argv = ["--device", device, "--size", str(model["size"]), "--ngf", str(model["ngf"]), "--ndf", str(model["ndf"]),
            "--n-blocks", str(model["n_blocks"]), "--steps", str(model["steps"]), "--warmup", str(model["warmup"]),
            "--peak-tflops", str(peak_tflops)]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return argv


def fastest_mid(runs: list, model: dict) -> dict | None:
    """The fastest bench run at the middle batch, bf16, 4 instances (the lean/plain pair), or None."""
    ok = [r for r in runs if isinstance(r, dict) and "samples_per_s" in r and r.get("batch") == model["batches"][1]
          and r.get("amp") == "bf16" and r.get("ins") == 4 and not r.get("channels_last")]
    return max(ok, key=lambda r: r["samples_per_s"]) if ok else None


def bench_runs(device: str, peak_tflops: float, model: dict, deadline: float, log, only_ins: bool = False,
               memory: str | None = None) -> list[dict]:
    from instagan import bench

    def one(**kw) -> dict:
        args = bench.make_parser().parse_args(bench_argv(device, peak_tflops, model, **kw))
        t0 = time.perf_counter()
        try:
            res = bench.run(args)
        except Exception as err:  # an out-of-memory or compile failure is a result too
            res = {"error": f"{type(err).__name__}: {err}"[:2000], **kw}
        res["wall_s"] = time.perf_counter() - t0
        log(f"[bench] {kw} -> " + (res.get("error") or f"{res['samples_per_s']:.2f} samples/s, "
                                   f"mfu {res.get('mfu', 0):.3f}, peak {res['peak_mem_gib']:.2f} GiB"))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return res

    small, mid, large = model["batches"][0], model["batches"][1], model["batches"][-1]
    out = [] if only_ins else [one(batch=mid, amp="bf16", memory="lean"), one(batch=mid, amp="bf16", memory="plain")]
    ok = [r for r in out if "error" not in r]
    memory = memory or (max(ok, key=lambda r: r["samples_per_s"])["memory"] if ok else "plain")
    ins_plan = [dict(batch=mid, amp="bf16", memory=m, ins=n, ins_max=n) for n in (2, 8) for m in ("lean", "plain")]
    plan = ins_plan if only_ins else [
            dict(batch=small, amp="bf16", memory=memory), dict(batch=large, amp="bf16", memory=memory),
            dict(batch=mid, amp="bf16", memory=memory, channels_last=True),
            dict(batch=mid, amp="none", memory=memory), *ins_plan]
    for kw in plan:
        if time.monotonic() > deadline:
            out.append({"skipped": "time limit", **kw})
            continue
        out.append(one(**kw))
    return out


def quality(data: Path, out: Path, work: Path, device: str, steps: int, model: dict, log,
            names: tuple[str, ...] = ("best", "paper")) -> dict:
    from instagan.config import Config
    from instagan.loop import train_local
    from instagan.metrics import evaluate, summary_table
    from instagan.visual import save_png

    best = Config.from_file(ROOT / "configs" / "ablations" / "instagan.yaml")
    paper = Config.from_file(ROOT / "configs" / "ablations" / "instagan_paper.yaml")
    size = 128 if model["size"] >= 128 else model["size"]
    common = {"model.ngf": model["ngf"], "model.ndf": model["ndf"], "model.n_blocks": model["n_blocks"],
              "data.root": str(data), "data.size": size, "data.load_size": size + size // 8,
              "train.batch_size": 4, "train.amp": "bf16", "train.epochs": 100000,
              "train.epochs_decay": 0, "run.max_steps": steps, "run.checkpoint_every": steps, "run.image_every": 0,
              "run.log_every": 50}
    recipes = {k: v for k, v in {"best": best.replace(**common), "paper": paper.replace(**common)}.items()
               if k in names}
    result = {"steps": steps, "data": str(data), "recipes": {}}
    for name, cfg in recipes.items():
        t0 = time.perf_counter()
        log(f"[quality] {name}: training {steps} steps")
        ckpt = train_local(cfg, work / name, device=device)
        train_s = time.perf_counter() - t0
        entry = {"train_s": train_s, "config": cfg.to_dict()}
        for split in ("test", "train"):
            report, grid = evaluate(ckpt, data, split, device=device, floors=True, grid_rows=5)
            save_png(grid, out / f"quality_{name}_{split}.png")
            entry[split] = report["rows"]
            entry[f"{split}_table"] = summary_table(report, keys=("bg_err", "inst", "iou", "area_ratio"))
        result["recipes"][name] = entry
        log(f"[quality] {name}: {steps} steps in {train_s:.0f} s\n{entry['test_table']}")
    return result


def segment_rates(device: str, model: dict, log) -> dict:
    import os

    import pyarrow.parquet as pq

    from data_prep.synthetic import write_synthetic
    from instagan.config import Config
    from instagan.data import read_sample
    from instagan.infer import Translator
    from instagan.networks import build_generator
    from instagan.segment import COCO_CATEGORIES, InstanceSegmenter, build_model

    tmp = Path(tempfile.mkdtemp(prefix="gpu_report_"))
    n, size, batch = (64, 200, 8) if model is PAPER else (4, model["size"], 2)
    write_synthetic(tmp, n=n, size=size, test_fraction=0.0, workers=min(4, os.cpu_count() or 1))
    rows = pq.read_table(sorted((tmp / "train" / "a").glob("*.parquet"))).to_pylist()
    items = [read_sample(r) for r in rows]
    images = [img for img, _ in items]
    cfg = Config.from_dict({"model": {"ngf": model["ngf"], "n_blocks": model["n_blocks"]},
                            "data": {"size": size, "load_size": size}})
    tr = Translator(build_generator(cfg.model), ins_max=20, ins_per=2, device=device, amp_dtype=torch.bfloat16)
    seg = InstanceSegmenter(build_model("maskrcnn_resnet50_fpn"), "maskrcnn_resnet50_fpn", COCO_CATEGORIES,
                            category="sheep", device=device, batch_size=batch)

    def rate(fn) -> float:
        fn(items[:batch])
        sync(device)
        t0 = time.perf_counter()
        fn(items)
        sync(device)
        return len(items) / (time.perf_counter() - t0)

    def translate(part):
        for i in range(0, len(part), batch):
            tr.translate_arrays(part[i:i + batch], size=size, batch_size=batch)

    seg_fp32 = rate(lambda part: seg.predict([img for img, _ in part]))
    translate_rate = rate(translate)
    both = 1 / (1 / seg_fp32 + 1 / translate_rate)
    try:  # autocast is the caller's choice for the segmenter (InstanceSegmenter runs in the model's fp32)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            seg_bf16 = rate(lambda part: seg.predict([img for img, _ in part]))
    except Exception as err:
        seg_bf16 = f"{type(err).__name__}: {err}"[:500]
    res = {"images": len(images), "size": size, "batch": batch, "segment_fp32_images_per_s": seg_fp32,
           "segment_bf16_autocast_images_per_s": seg_bf16, "translate_bf16_images_per_s": translate_rate,
           "segment_then_translate_images_per_s": both,
           "note": "untrained R50 finds nothing, so segment+translate is 1/(1/seg + 1/translate) of the two rates"}
    log(f"[segment] {res}")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--data", required=True, help="data_prep Parquet set with train and test splits (real photos)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 TFLOP/s (H100/H200 SXM)")
    p.add_argument("--steps", type=int, default=0, help="quality training steps per recipe (0: from --quality-s)")
    p.add_argument("--quality-s", type=float, default=80.0, help="about this many seconds of training per recipe")
    p.add_argument("--limit-s", type=float, default=420.0, help="skip what would end after this many seconds")
    p.add_argument("--parts", nargs="*", default=["peak", "bench", "quality", "segment", "compile"])
    p.add_argument("--work", help="run folders of the quality part (default: a new temporary folder)")
    p.add_argument("--recipes", nargs="*", default=["best", "paper"], help="quality: of best, paper")
    p.add_argument("--bench-ins-only", action="store_true", help="bench: only the instance-count runs")
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes: checks the script on a CPU")
    a = p.parse_args(argv)
    model = SMOKE if a.smoke else PAPER
    t_start = time.monotonic()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    report: dict = {"torch": torch.__version__, "device": a.device, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)

    def log(line: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {line}", flush=True)

    def save() -> None:
        report["elapsed_s"] = time.monotonic() - t_start
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))

    def part(name: str, fn, need_s: float = 0.0) -> None:
        if name not in a.parts:
            return
        if time.monotonic() - t_start + need_s > a.limit_s:
            report[name] = {"skipped": f"would not end within --limit-s {a.limit_s:.0f}"}
            log(f"[{name}] skipped: time")
            return
        t0 = time.monotonic()
        try:
            report[name] = fn()
        except Exception:
            report[name] = {"error": traceback.format_exc()[-3000:]}
            log(f"[{name}] failed:\n{report[name]['error']}")
        report.setdefault("part_s", {})[name] = time.monotonic() - t0
        save()

    part("peak", lambda: {"bf16_matmul_tflops": matmul_peak(device, model["matmul"]), "n": model["matmul"]})
    log(f"[peak] {report.get('peak')}")
    part("bench", lambda: bench_runs(a.device, a.peak_tflops, model, t_start + a.limit_s * 0.35, log,
                                     a.bench_ins_only))
    steps = a.steps
    if not steps:  # from the paper-size step time at batch 4, 128 px: about a quarter of 200 px batch 8's
        fastest = fastest_mid(report.get("bench", []), model)
        step_s = model["batches"][1] / fastest["samples_per_s"] * 0.25 * 1.5 if fastest else 0.5
        steps = max(20, int(a.quality_s / step_s))
    part("segment", lambda: segment_rates(a.device, model, log), need_s=20)
    work = Path(a.work or tempfile.mkdtemp(prefix="gpu_report_runs_"))
    part("quality", lambda: quality(Path(a.data), out, work, a.device, steps, model, log, tuple(a.recipes)),
         need_s=len(a.recipes) * a.quality_s)

    def compiled() -> list[dict]:
        from instagan import bench
        mid = model["batches"][1]
        fastest = fastest_mid(report.get("bench", []), model)
        memory = fastest["memory"] if fastest else "plain"
        res = bench.run(bench.make_parser().parse_args(
            bench_argv(a.device, a.peak_tflops, model, batch=mid, amp="bf16", memory=memory, compile=True)))
        log(f"[compile] {res['samples_per_s']:.2f} samples/s, first step {res['first_step_s']:.0f} s")
        return [res]

    part("compile", compiled, need_s=90)
    save()
    log(f"done in {time.monotonic() - t_start:.0f} s -> {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
