"""The quality harness end to end on a tiny budget: equal CPU seconds per recipe, curves, grid, metrics.json."""

import json

import numpy as np
from PIL import Image

from data_prep.synthetic import write_synthetic
from jobs import ablate as ablate_job


def test_harness_trains_each_recipe_for_the_same_cpu_budget_and_writes_its_report(tmp_path, capsys):
    write_synthetic(tmp_path / "data", n=16, size=72, test_fraction=0.25)  # 12 + 12 training, 4 + 4 test images
    budget_min = 0.1
    argv = ["--budget-cpu-min", str(budget_min), "--out", str(tmp_path / "out"), "--recipes", "instagan", "cyclegan",
            "--data-root", str(tmp_path / "data"), "--points", "2", "--set", "run.log_every=1"]
    assert ablate_job.main(argv) == 0
    out = tmp_path / "out"
    report = json.loads((out / "metrics.json").read_text())
    assert report["recipes"] == ["instagan", "cyclegan"]
    for name in report["recipes"]:
        final, curve = report["final"][name], report["curves"][name]
        # Budget mode: every recipe stops once it has spent the budget (one step past it at most), whatever its
        # step cost, and the curve has one point per 1/points of the budget.
        assert budget_min * 60 <= final["cpu_s"] < budget_min * 60 + 30
        assert len(curve) == 2 and curve[0]["cpu_s"] < curve[1]["cpu_s"]
        assert 0 <= final["a2b"]["img_shape"] <= 1 and final["a2b"]["bg_err"] >= 0
        assert report["configs"][name]["data"]["root"] == str(tmp_path / "data")
    # The cheaper baseline takes more steps in the same CPU time than InstaGAN.
    assert report["final"]["cyclegan"]["step"] > report["final"]["instagan"]["step"]
    assert report["floors"]["identity"]["a2b"]["bg_err"] == 0
    assert set(report["floors"]["untrained"]) == {"instagan", "cyclegan"}
    assert any(t["metric"] == "img_shape a2b" and "cyclegan" in t["target"] for t in report["targets"])
    printed = capsys.readouterr().out
    assert "| instagan |" in printed and "| identity |" in printed and "img_shape a2b >= 0.5" in printed

    curves = np.asarray(Image.open(out / "curves.png").convert("RGB"))
    assert curves.shape[0] > 200 and curves.shape[1] > 800 and curves.std() > 10  # a drawn figure, not blank
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    cell = 128  # 64 px test images shown at 2x
    assert grid.shape[0] > 2 * 3 * cell  # 3 a->b rows and 3 b->a rows below a header strip
    header = grid[:16, 60:]  # the column labels drawn on white above the cells
    assert (header > 200).mean() > 0.7 and (header < 100).any()

    # A second run with the same --out reuses what was trained for this budget.
    assert ablate_job.main(argv) == 0
    assert "already trained" in capsys.readouterr().out
