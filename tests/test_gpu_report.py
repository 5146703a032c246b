"""jobs/gpu_report.py, the GPU figures in one run, checked end to end on the CPU with tiny models (--smoke), so the
script a GPU session runs has run before it gets there."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHP2GIR = ROOT.parent / "shared" / "data" / "shp2gir_coco_sample"


def test_gpu_report_smoke_writes_every_part(tmp_path):
    src = tmp_path / "src"
    for phase, ids in (("train", ("1134", "139", "2075", "2316")), ("test", ("1106", "380"))):
        for d in "AB":
            (src / f"{phase}{d}").mkdir(parents=True)
            (src / f"{phase}{d}_seg").mkdir(parents=True)
            for f in (SHP2GIR / f"sample{d}").glob("*.png"):
                if f.stem in ids:
                    (src / f"{phase}{d}" / f.name).write_bytes(f.read_bytes())
                    for m in (SHP2GIR / f"sample{d}_seg").glob(f"{f.stem}_*.png"):
                        (src / f"{phase}{d}_seg" / m.name).write_bytes(m.read_bytes())
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "data_prep", "folder", str(src), "--out", str(data), "--max-side", "64",
                    "--quiet", "--workers", "1"], cwd=ROOT, check=True)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "jobs/gpu_report.py", "--device", "cpu", "--smoke", "--out", str(out),
                           "--data", str(data), "--work", str(tmp_path / "runs"), "--steps", "2",
                           "--parts", "peak", "bench", "quality", "--bench-ins-only", "--recipes", "best"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread: a busy machine stays fast
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["peak"]["bf16_matmul_tflops"] > 0
    runs = report["bench"]
    assert [(r["ins"], r["memory"]) for r in runs] == [(2, "lean"), (2, "plain"), (8, "lean"), (8, "plain")]
    assert all(r["samples_per_s"] > 0 and r["peak_mem_bytes"] > 0 for r in runs)
    assert list(report["quality"]["recipes"]) == ["best"]  # the paper recipe is the same path with another config
    for name in ("best",):
        rec = report["quality"]["recipes"][name]
        assert rec["config"]["run"]["max_steps"] == 2
        for split in ("test", "train"):
            assert set(rec[split]) >= {"model", "identity", "untrained"}
            assert rec[split]["identity"]["a2b"]["bg_err"] == 0.0
            assert (out / f"quality_{name}_{split}.png").stat().st_size > 1000
