"""``python train.py --config configs/demo.yaml optim.lr=3e-4`` is ``align train ...``.

The recipe itself reads top to bottom in align/train/recipe.py.
"""
import sys

from align.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
