"""The layers stay apart: the instagan core (networks, training step and loop, inference, data, metrics) imports
and trains without Ray; only instagan.distributed's modules import it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["instagan.networks", "instagan.train", "instagan.loop", "instagan.infer", "instagan.data",
        "instagan.metrics", "instagan.visual", "instagan.checkpoint", "instagan.segment", "instagan.segment_train",
        "instagan.distributed"]


def test_the_core_imports_without_ray():
    code = (f"import sys; import {', '.join(CORE)}; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout[:500]
    with_ray = subprocess.run([sys.executable, "-c", "import sys, instagan.distributed.train; "
                               "print('ray' in sys.modules)"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert with_ray.stdout.strip() == "True", with_ray.stderr[-500:]  # the check above can see Ray when it is there


def test_only_instagan_distributed_imports_ray():
    offenders = []
    for path in sorted((ROOT / "instagan").rglob("*.py")):
        if "distributed" in path.relative_to(ROOT / "instagan").parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            words = line.strip().split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1 and words[1].split(".")[0] == "ray":
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
