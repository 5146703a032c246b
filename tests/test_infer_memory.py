"""Translator memory: sequential inference over 20 instances needs no more working memory than over 4 (ins_per 2).

    .venv/bin/python -m pytest -q tests/test_infer_memory.py        # ~15 s on a quiet 2-core machine, no Ray

Each case runs in a fresh Python process that builds the generator and its input, then translates once; the working
memory is the process's peak RSS (ru_maxrss) minus its RSS just before the call. glibc's malloc is told to map every
allocation of 64 KiB or more on its own and hand it back on free (MALLOC_MMAP_THRESHOLD_), so RSS follows the live
tensors instead of a heap that only grows. A control case translates the 20 instances in ONE chunk (ins_per 20):
its peak must be several times higher, which shows the measurement sees per-chunk memory and that the test fails
if the loop stops chunking.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256  # image side: large enough that a chunk's activations dwarf the process's noise
PROBE = r"""
import json, os, sys
import numpy as np
import torch
torch.set_num_threads(1)
from instagan.infer import Translator
from instagan.networks import SetGenerator

n, ins_per, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
tr = Translator(SetGenerator(ngf=16, n_blocks=1), ins_max=20, ins_per=ins_per)
masks = np.zeros((n, size, size), bool)
cell = size // 5
for k in range(n):  # disjoint rectangles of different areas, on a 5 x 5 grid
    r, c = divmod(k, 5)
    masks[k, r * cell:(r + 1) * cell - k % 3, c * cell:(c + 1) * cell] = True
img = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS: set-up peaks do not count
    f.write("5")
base = status("VmRSS")
before = status("VmHWM")
res = tr.translate_arrays([(img, masks)], size=0)[0]  # native size: what jobs/translate.py --size native runs
ok = bool(res.translated.all()) and res.masks.shape == masks.shape
peak = status("VmHWM")
print(json.dumps({"work": peak - base, "before": before - base, "ok": ok}))
"""


def measure(cases: list[tuple[int, int]]) -> list[dict]:
    """Run the probe for each (instances, ins_per) in its own process (concurrently: ru_maxrss is per process)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE, str(n), str(per), str(SIZE)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n, per in cases]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_peak_memory_is_flat_in_the_number_of_instances():
    # through translate_arrays (what jobs/translate.py and jobs/serve.py call), which runs `translate`
    four, twenty, one_chunk = measure([(4, 2), (20, 2), (20, 20)])
    assert four["ok"] and twenty["ok"] and one_chunk["ok"]
    for r in (four, twenty, one_chunk):  # the call itself set the peak, not the set-up before it
        assert r["work"] > r["before"] + 16 * 2**20, r
    # The input and output masks themselves scale with the instance count (sorted copy, translated masks, the
    # arrays API's float and resized copies): allow 6 float copies of the 16 extra masks, nothing for activations.
    masks_allowance = 6 * 16 * SIZE * SIZE * 4
    mb = {k: round(r["work"] / 2**20, 1) for k, r in (("4", four), ("20", twenty), ("20_one_chunk", one_chunk))}
    assert twenty["work"] <= four["work"] * 1.05 + masks_allowance, mb
    # the control: the same 20 instances in one chunk need far more, so a loop that stopped chunking fails above
    assert one_chunk["work"] > 3 * four["work"], mb


LARGE = r"""
import json, sys
import numpy as np
import torch
torch.set_num_threads(1)
from instagan.config import Config
from instagan.infer import Translator
from instagan.networks import build_generator

k, side = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
cfg = Config.from_dict({"model": {"ngf": 4, "n_blocks": 1}, "data": {"size": 64, "load_size": 64}})
tr = Translator(build_generator(cfg.model), ins_max=20, ins_per=2)
tr.config = cfg
img = np.full((side, side, 3), 100, np.uint8)
masks = np.zeros((k, side, side), bool)
for n in range(k):
    masks[n, 100 * n:100 * n + 80, 100:300] = True
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
res = tr.translate_arrays([(img, masks)], size=None)[0]  # --size model: work at 64 px, answer at 2048 px
print(json.dumps({"work": status("VmHWM") - base, "ok": res.masks.shape == masks.shape}))
"""


def test_a_large_photo_costs_little_more_than_its_bool_masks_per_instance():
    """--size model on a 2048 x 2048 photo: each mask goes to the working size and back one at a time, so an extra
    instance costs about its bool output mask (4 MiB), not float copies of every mask at full size at once (16 MiB
    each; the earlier code measured 24 MiB per mask here, 84 MiB at 4096 px in serve)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    side, runs = 2048, {}
    for k in (1, 12):
        p = subprocess.run([sys.executable, "-c", LARGE, str(k), str(side)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[k] = json.loads(p.stdout.strip().splitlines()[-1])
        assert runs[k]["ok"]
    per_mask = (runs[12]["work"] - runs[1]["work"]) / 11
    assert per_mask < 8 * 2**20, {k: r["work"] / 2**20 for k, r in runs.items()}
