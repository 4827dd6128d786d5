"""Command line: ``st-predict demo`` (or ``python -m st_predict demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``st-predict`` command."""
    parser = argparse.ArgumentParser(prog="st-predict", description="Spatial gene expression from H&E (NH2ST).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train NH2ST on all sections but one, predict the held-out one, print metrics, save a figure",
        description=(
            "Train NH2ST (frozen ResNet18 trunk) on HER2ST-format sections, or on the built-in synthetic "
            "tissue when no data is given and the HER2ST files cannot be fetched; predict the held-out "
            "section; print PCC/MSE/MAE; write metrics.json and predicted_vs_measured.png."
        ),
    )
    demo.add_argument("--data", default=None, help="folder in the HER2ST layout (counts/, spots/, images/)")
    demo.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    demo.add_argument("--test-section", default=None, help="held-out section (default: the first)")
    demo.add_argument("--image-size", type=int, default=None, help="trunk input size in px (default: 224 for HER2ST)")
    demo.add_argument("--weights", default="imagenet", help="'imagenet', 'random' or a ResNet18 weights file")
    demo.add_argument("--no-fetch", action="store_true", help="do not try to download HER2ST")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from st_predict._demo import run_demo

        try:
            run_demo(data=args.data, out=args.out, epochs=args.epochs, test_section=args.test_section,
                     image_size=args.image_size, weights=args.weights, fetch=not args.no_fetch, seed=args.seed)
        except (ValueError, KeyError, FileNotFoundError) as err:
            print(f"st-predict demo: error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
