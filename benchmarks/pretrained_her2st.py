"""Pretrained predictors beside NH2ST on HER2ST, leave-one-section-out, through ``st-predict benchmark`` (issue 31).

No pretrained weights can be downloaded here, so the predictors run on **random weights**, written where their
loaders read them:

- Path2Space: a small random stand-in of CTransPath (a strided convolution, 768-dim output, as an exported program)
  and a random head, in an offline Hugging Face cache. Its gene list leaves out every tenth HER2ST gene, so the
  table's "genes not output" column is exercised.
- STPath: its real architecture (STFM) with random weights and a vocabulary of its released size, through
  ``model_path=`` / ``gene_voc_path=``. GigaPath (a ViT-giant) is out of reach on a 2-core CPU: the 1,536-dim
  features come from a random timm MixNet-XL instead, its weights drawn once (seed 0) and passed as a file, so every
  fold and mode runs the same predictor and its features are computed once per section.

Random weights measure the harness, not the predictors: the folds, the gene counting, the calibration on the
training sections only and the reliability columns. Their PCC is that of random features, and nothing here says how
well STPath or Path2Space predict HER2ST. NH2ST runs with ``--reliability`` (its fold models), so both kinds of rows
have the coverage, width and reliability columns.

Usage:  python benchmarks/pretrained_her2st.py [--data ../shared/data/her2st] [--folds C2 ...] [--epochs N]
        [--methods path2space stpath NH2ST] [--out FOLDER]
Writes benchmarks/results/pretrained_her2st/results.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the label every table of this script carries
TITLE = ("RANDOM WEIGHTS for the pretrained predictors (Path2Space: a random stand-in of CTransPath and a random head; "
         "STPath: its architecture with random weights on random MixNet-XL features): their rows measure the harness "
         "(folds, gene counting, calibration on the training sections, reliability columns), not the predictors.")


def label(out: Path) -> None:
    """Put :data:`TITLE` into ``results.json`` and at the top of ``results.md``."""
    import json

    from st_predict.benchmark import to_markdown

    result = json.loads((out / "results.json").read_text())
    result["title"] = TITLE
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(to_markdown(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "her2st"))
    p.add_argument("--folds", nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=None, help="NH2ST's epochs (default: the recipe's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pretrained_her2st"))
    p.add_argument("--methods", nargs="+", default=["path2space", "stpath", "NH2ST"])
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from pretrained_fixtures import write_path2space, write_stpath

    from st_predict.data import read_her2st

    genes = list(read_her2st(args.data).var_names)
    with tempfile.TemporaryDirectory(prefix="st-predict-pretrained-") as tmp:
        tmp = Path(tmp)
        write_path2space(tmp / "hf" / "hub", [g for i, g in enumerate(genes) if i % 10])
        weights, voc = write_stpath(tmp, genes)
        import timm
        import torch

        torch.manual_seed(0)
        encoder = tmp / "mixnet_xl_random.pt"
        torch.save(timm.create_model("mixnet_xl", pretrained=False).state_dict(), encoder)
        env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "st_predict", "benchmark", args.data, "--out", args.out, "--overwrite",
               "--methods", *args.methods, "--reliability",
               "--pretrained-option", f"stpath:model_path={weights}", f"stpath:gene_voc_path={voc}",
               "stpath:encoder=timm:mixnet_xl", f"stpath:encoder_weights={encoder}"]
        if args.folds:
            cmd += ["--folds", *args.folds]
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        print(" ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        print(f"{time.perf_counter() - start:.0f} s")
    label(Path(args.out))


if __name__ == "__main__":
    main()
