"""The quality harness: training recipes compared at the same CPU budget on the same generated set.

    python jobs/ablate.py --budget-cpu-min 60 --out /tmp/ablate
    report = run(out, budget_cpu_s=3600)          # the four recipes of RECIPES; -> the metrics.json dict

Each recipe (a config file) trains in its own process (`instagan.loop.train_local` in budget mode: the same
number of process CPU-seconds for every recipe, not the same steps) and saves a checkpoint after each
1/`points` of its budget. Every checkpoint is then evaluated on the test split (`instagan.metrics.evaluate`:
translation a->b and b->a, ins_max 20, ins_per 2) and the last one also with its floors (identity: output =
input; untrained: fresh generators of the same config). The folder gets:
- metrics.json: per recipe its config, CPU-seconds, steps, the curve (metrics at each checkpoint) and the final
  metrics; the floors; the targets of the quality issue and whether the first recipe meets each;
- curves.png: each headline metric against training CPU-minutes, one line per recipe, floors dashed;
- grid.png: test images a->b and b->a (input with masks, each recipe's translated image, the first recipe's
  translated masks), labelled.
Runs are resumable per recipe: a recipe whose run folder already has its final checkpoint is not trained again,
one stopped part way continues from its latest checkpoint (same config and budget, or it stops with an error).
No Ray: processes from `concurrent.futures`.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import torch

from instagan.config import Config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "ablations"
RECIPES = {  # name -> config file: the best recipe first (targets are checked on it), then the paper and baselines
    "instagan": CONFIGS / "instagan.yaml",
    "instagan_paper": CONFIGS / "instagan_paper.yaml",
    "cyclegan": CONFIGS / "cyclegan.yaml",
    "cyclegan_seg": CONFIGS / "cyclegan_seg.yaml",
}
DATA = {"n": 600, "size": 72, "test_fraction": 0.1, "seed": 0}  # 540 + 540 training, 60 + 60 test images
HEADLINE = ("img_shape", "mask_shape", "bg_err", "inst", "area_ratio", "img_survive")
# The quality issue's targets on the test split, checked on the first recipe. (metric, direction, op, value)
TARGETS = [("img_shape", "a2b", ">=", 0.5), ("mask_shape", "a2b", ">=", 0.8), ("inst", "a2b", ">=", 0.95),
           ("area_ratio", "a2b", ">=", 0.7), ("area_ratio", "a2b", "<=", 1.4), ("bg_err", "a2b", "<=", 0.08),
           ("bg_err", "b2a", "<=", 0.08)]


def ensure_data(root: str | Path, n: int = DATA["n"], size: int = DATA["size"], seed: int = DATA["seed"],
                test_fraction: float = DATA["test_fraction"]) -> Path:
    """The generated ellipse/rectangle set at `root` (written once; reused when its metadata matches)."""
    from data_prep.synthetic import write_synthetic

    root = Path(root)
    meta_file = root / "metadata.json"
    want = {"size": size, "seed": seed, "ins": [1, 6]}
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("generator") == want and meta.get("counts", {}).get("test/a", {}).get("images") == \
                round(n * test_fraction):
            return root
    write_synthetic(root, n=n, size=size, seed=seed, test_fraction=test_fraction,
                    workers=min(2, os.cpu_count() or 1))
    return root


def _exit_with_parent(every_s: float = 2.0) -> None:
    """Worker initializer: exit when the harness process is gone (killed, not just interrupted: Ctrl-C reaches the
    whole process group), so a stopped harness leaves no training burning CPU for the rest of its budget."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _train(name: str, cfg_dict: dict, folder: str, budget_cpu_s: float, points: int, threads: int) -> dict:
    """One recipe in a worker process. -> {"name", "cpu_s", "steps", "wall_s"}."""
    torch.set_num_threads(threads)
    from instagan.loop import train_local

    cfg = Config.from_dict(cfg_dict)
    t0 = time.perf_counter()
    last = train_local(cfg, folder, budget_cpu_s=budget_cpu_s, checkpoints=points, resume=True)
    prog = json.loads((last / "progress.json").read_text())
    return {"name": name, "cpu_s": prog["cpu_s"], "steps": prog["step"], "wall_s": time.perf_counter() - t0}


def _evaluate(ckpt: str, data_root: str, classifier: str | None, floors: bool, threads: int) -> dict:
    """Metrics of one checkpoint (and its floors if asked) in a worker process; the grid is not kept."""
    torch.set_num_threads(threads)
    from instagan.metrics import evaluate

    report, _ = evaluate(ckpt, data_root, "test", classifier, floors=floors)
    prog = json.loads((Path(ckpt) / "progress.json").read_text())
    return {"checkpoint": ckpt, **prog, "rows": report["rows"], "skipped": len(report["skipped"])}


def _finished(folder: Path, budget_cpu_s: float) -> bool:
    for ck in folder.glob("checkpoint_step*/progress.json"):
        if json.loads(ck.read_text())["cpu_s"] >= budget_cpu_s:
            return True
    return False


def check_targets(final: dict[str, dict], recipes: list[str]) -> list[dict]:
    """The issue's targets on the first recipe's final metrics, and whether it is ahead of each baseline on
    img_shape a2b (higher) and bg_err (lower, both directions)."""
    best = recipes[0]
    out = []
    for key, direction, op, value in TARGETS:
        got = final[best][direction].get(key)
        ok = got is not None and (got >= value if op == ">=" else got <= value)
        out.append({"recipe": best, "metric": f"{key} {direction}", "target": f"{op} {value}", "value": got,
                    "met": ok})
    for base in (r for r in recipes if final.get(r) and r.startswith("cyclegan")):
        for key, direction, better in (("img_shape", "a2b", max), ("bg_err", "a2b", min), ("bg_err", "b2a", min)):
            mine, theirs = final[best][direction].get(key), final[base][direction].get(key)
            ok = None not in (mine, theirs) and mine != theirs and better(mine, theirs) == mine
            shown = "-" if theirs is None else f"{theirs:.3f}"
            out.append({"recipe": best, "metric": f"{key} {direction}", "target": f"ahead of {base} ({shown})",
                        "value": mine, "met": ok})
    return out


def run(out: str | Path, budget_cpu_s: float, recipes: dict[str, Config] | None = None,
        data_root: str | Path | None = None, points: int = 6, threads: int = 1, parallel: int | None = None,
        classifier: str | None = None, grid_rows: int = 3, log=print) -> dict:
    """Train every recipe for `budget_cpu_s` CPU-seconds, evaluate, write metrics.json, curves.png, grid.png.

    recipes: name -> Config (default: the files of RECIPES); data.root is replaced by `data_root` (default: a
    generated set in <out>/data, see DATA). threads: torch threads per training process; parallel: processes at
    once (default: CPU count // threads). -> the metrics.json content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(data_root) if data_root else ensure_data(out / "data")
    recipes = recipes or {name: Config.from_file(path) for name, path in RECIPES.items()}
    parallel = parallel or max(1, (os.cpu_count() or 1) // threads)
    cfgs = {name: cfg.replace(**{"data.root": str(data_root), "data.split": "train", "run.name": name,
                                 "run.image_every": 0})
            for name, cfg in recipes.items()}
    t0 = time.perf_counter()
    log(f"[ablate] {len(cfgs)} recipes x {budget_cpu_s / 60:.1f} CPU-min, {parallel} at a time with {threads} "
        f"thread(s) each, data {data_root}, out {out}")
    curves, floor_rows = _train_and_evaluate(cfgs, out, data_root, budget_cpu_s, points, threads, parallel,
                                             classifier, log)
    for c in curves.values():
        c.sort(key=lambda p: p["cpu_s"])
    final = {name: c[-1] for name, c in curves.items() if c}
    names = list(cfgs)
    report = {
        "budget_cpu_s": budget_cpu_s, "data_root": str(data_root), "threads": threads, "parallel": parallel,
        "wall_s": time.perf_counter() - t0, "recipes": names,
        "configs": {name: cfg.to_dict() for name, cfg in cfgs.items()},
        "final": {name: {"cpu_s": p["cpu_s"], "step": p["step"], "a2b": p["a2b"], "b2a": p["b2a"]}
                  for name, p in final.items()},
        "floors": {"identity": next(iter(floor_rows.values()))["identity"] if floor_rows else None,
                   "untrained": {name: f["untrained"] for name, f in floor_rows.items()}},
        # real target-domain test images measured as they are: what a translator whose output looks like the
        # target domain scores (occluded instances do not read as their shape; metrics.evaluate)
        "ceiling": next(iter(floor_rows.values())).get("real_target") if floor_rows else None,
        "real": next((f["real"] for f in floor_rows.values() if "real" in f), None),
        "curves": curves,
    }
    report["targets"] = check_targets(report["final"], names)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    plot_curves(report, out / "curves.png")
    comparison_grid(report, data_root, out / "grid.png", grid_rows)
    log(table(report))
    log(f"[ablate] wrote {out / 'metrics.json'}, {out / 'curves.png'}, {out / 'grid.png'}")
    return report


def _train_and_evaluate(cfgs: dict[str, Config], out: Path, data_root: Path, budget_cpu_s: float, points: int,
                        threads: int, parallel: int, classifier: str | None, log) -> tuple[dict, dict]:
    """Train the recipes not trained yet, `parallel` processes at once, then evaluate every checkpoint.
    -> ({name: [curve point]}, {name: floor rows of its last checkpoint})."""
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(parallel, mp_context=ctx, initializer=_exit_with_parent) as pool:
        jobs = {}
        for name, cfg in cfgs.items():
            if _finished(out / "runs" / name, budget_cpu_s):
                log(f"[ablate] {name}: already trained, reusing {out / 'runs' / name}")
                continue
            jobs[pool.submit(_train, name, cfg.to_dict(), str(out / "runs" / name), budget_cpu_s, points,
                             threads)] = name
        for fut in cf.as_completed(jobs):
            res = fut.result()
            log(f"[ablate] {res['name']}: {res['steps']} steps in {res['cpu_s']:.0f} CPU-s "
                f"({res['wall_s']:.0f} s wall)")
        evals = {}
        for name in cfgs:
            ckpts = sorted((out / "runs" / name).glob("checkpoint_step*"), key=lambda p: p.name)
            for i, ck in enumerate(ckpts):
                evals[pool.submit(_evaluate, str(ck), str(data_root), classifier, i == len(ckpts) - 1, threads)] = name
        curves: dict[str, list] = {name: [] for name in cfgs}
        floor_rows: dict[str, dict] = {}
        for fut in cf.as_completed(evals):
            res = fut.result()
            name = evals[fut]
            rows = res.pop("rows")
            curves[name].append({**res, **rows["model"]})
            if "identity" in rows:
                floor_rows[name] = {k: v for k, v in rows.items() if k != "model"}
    return curves, floor_rows


def table(report: dict) -> str:
    """Markdown table of the final metrics and the floors, then the targets."""
    cols = [f"{k} {d}" for k in HEADLINE for d in ("a2b", "b2a")]

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| row | CPU-s | steps | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for name, f in report["final"].items():
        lines.append(f"| {name} | {f['cpu_s']:.0f} | {f['step']} | "
                     + " | ".join(fmt(f[c.split()[1]].get(c.split()[0])) for c in cols) + " |")
    floors = report["floors"]
    rows = [("identity", floors["identity"])] if floors["identity"] else []
    rows += [(f"untrained ({n})", f) for n, f in floors["untrained"].items()]
    if report.get("ceiling"):
        rows.append(("real target images (ceiling)", report["ceiling"]))
    for label, f in rows:
        lines.append(f"| {label} | | | " + " | ".join(fmt(f[c.split()[1]].get(c.split()[0])) for c in cols) + " |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = "yes" if t["met"] else "NO"
        lines.append(f"| {t['recipe']}: {t['metric']} {t['target']} | {fmt(t['value'])} | {met} |")
    return "\n".join(lines)


def plot_curves(report: dict, path: str | Path) -> Path:
    """curves.png: one panel per headline metric (a2b solid, b2a dotted) against training CPU-minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("img_shape", "mask_shape", "bg_err", "img_survive")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ident = report["floors"]["identity"] or {}
    for ax, key in zip(axes, keys):
        for i, name in enumerate(report["recipes"]):
            pts = report["curves"].get(name, [])
            for d, style in (("a2b", "-"), ("b2a", ":")):
                xs = [p["cpu_s"] / 60 for p in pts if p[d].get(key) is not None]
                ys = [p[d][key] for p in pts if p[d].get(key) is not None]
                if xs:
                    ax.plot(xs, ys, style, marker="o", ms=3, color=colours[i % len(colours)],
                            label=f"{name} {d}" if d == "a2b" else None)
        if ident.get("a2b", {}).get(key) is not None:
            ax.axhline(ident["a2b"][key], color="grey", ls="--", lw=1, label="identity a2b")
        ceiling = (report.get("ceiling") or {}).get("a2b", {}).get(key)
        if ceiling is not None:
            ax.axhline(ceiling, color="grey", ls=":", lw=1.2, label="real b images a2b (ceiling)")
        for metric, d, _, value in TARGETS:
            if metric == key and d == "a2b":
                ax.axhline(value, color="black", ls="-.", lw=0.8, label="target" if key != "bg_err" else None)
        ax.set_title(key + (" (lower is better)" if key == "bg_err" else ""))
        ax.set_xlabel("training CPU-minutes")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"test split, equal CPU budget ({report['budget_cpu_s'] / 60:g} CPU-min per recipe); "
                 "solid a->b, dotted b->a", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def comparison_grid(report: dict, data_root: str | Path, path: str | Path, rows: int = 3) -> Path:
    """grid.png: for the first `rows` test images of each domain: input + masks | each recipe's translated image |
    the first recipe's translated image + masks, with column and row labels."""
    from instagan import visual
    from instagan.metrics import load_split, translate
    from instagan.train import build_networks

    size = next(iter(report["configs"].values()))["data"]["size"]
    names = report["recipes"]
    gens = {}
    for name in names:
        ck = report["final"].get(name) and report["curves"][name][-1]["checkpoint"]
        if not ck:
            continue
        from instagan import checkpoint

        cfg, payload = checkpoint.load(ck)
        nets = build_networks(cfg)
        for g in ("G_ab", "G_ba"):
            nets[g].load_state_dict(payload[g])
        gens[name] = nets
    cells, row_labels = [], []
    for direction, d, g in (("a2b", "a", "G_ab"), ("b2a", "b", "G_ba")):
        batches, _ = load_split(data_root, "test", d, size, limit=rows, batch_size=rows)
        batch = batches[0]
        outs = {name: translate(nets[g], batch, 20, 2)[0] for name, nets in gens.items()}
        for i in range(batch["img"].shape[0]):
            row = [visual.overlay(batch["img"][i], batch["masks"][i], batch["valid"][i])]
            row += [visual.to_unit(outs[name].img[i]) for name in gens]
            best = outs[names[0]]
            row.append(visual.overlay(best.img[i], best.masks[i], best.valid[i]))
            cells.append(row)
            row_labels.append(f"{direction} #{i}")
    cols = ["input + masks", *gens, f"{names[0]} + masks"]
    grid = visual.labelled_grid(cells, cols, row_labels, scale=max(1, 128 // size))
    return visual.save_png(grid, path)
