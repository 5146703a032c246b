"""The quality harness in one command: recipes trained on the same generated set for the same CPU seconds, then
evaluated on its test split against the floors (instagan/ablate.py does the work).

    python jobs/ablate.py --budget-cpu-min 60 --out /tmp/ablate          # the four recipes, about 2 h on 2 cores
    python jobs/ablate.py --budget-cpu-min 2 --recipes instagan cyclegan  # a quick look
    python jobs/ablate.py --budget-cpu-min 20 --config lr=my.yaml --set train.lr_g=1e-4   # own recipes, overrides

Recipes (configs/ablations/): instagan (the best recipe), instagan_paper (the paper's), cyclegan, cyclegan_seg.
Writes <out>/metrics.json, <out>/curves.png (metrics against CPU-minutes) and <out>/grid.png (labelled
translations of test images), prints the final table with the floors and the targets. Re-running with the same
--out reuses the recipes already trained for that budget.
"""

from __future__ import annotations

import argparse
import sys

from instagan import ablate
from instagan.config import Config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python jobs/ablate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-cpu-min", type=float, default=60.0, help="training CPU-minutes per recipe")
    p.add_argument("--out", default="ablate", help="output folder")
    p.add_argument("--recipes", nargs="*", default=list(ablate.RECIPES), help=f"of {', '.join(ablate.RECIPES)}")
    p.add_argument("--config", action="append", default=[], metavar="NAME=FILE", help="an extra recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key in every recipe (repeatable)")
    p.add_argument("--data-root", help="a data_prep Parquet set (default: generated into <out>/data)")
    p.add_argument("--points", type=int, default=6, help="checkpoints (curve points) per recipe")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--parallel", type=int, default=None, help="training processes at once (default: cores // threads)")
    p.add_argument("--classifier", help="a classifier from jobs/train_classifier.py, for cls / cls_masked")
    a = p.parse_args(argv)
    if a.budget_cpu_min <= 0 or a.points < 1 or a.threads < 1 or (a.parallel is not None and a.parallel < 1):
        p.error("--budget-cpu-min must be > 0 and --points, --threads, --parallel >= 1")
    try:
        files = {name: ablate.RECIPES[name] for name in a.recipes}
        for item in a.config:
            name, sep, path = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--config expects NAME=FILE, got {item!r}")
            files[name] = path
        recipes = {name: Config.from_file(path) for name, path in files.items()}
        dotted = dict(item.split("=", 1) for item in a.overrides if "=" in item)
        if len(dotted) != len(a.overrides):
            raise ValueError("--set expects SECTION.KEY=VALUE")
        recipes = {name: cfg.replace(**dotted) if dotted else cfg for name, cfg in recipes.items()}
    except KeyError as err:
        print(f"error: unknown recipe {err} (known: {', '.join(ablate.RECIPES)})", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not recipes:
        p.error("no recipe to run")
    ablate.run(a.out, a.budget_cpu_min * 60, recipes, a.data_root, a.points, a.threads, a.parallel, a.classifier)
    return 0


if __name__ == "__main__":
    sys.exit(main())
