#!/usr/bin/env python
"""A Medical Segmentation Decathlon task → a datalist with a seeded, recorded train/validation split.

    python data_prep/msd.py --task /data/MSD/Task09_Spleen --out /data/MSD --val-fraction 0.2 --seed 0
    python data_prep/msd.py --task /data/MSD/Task01_BrainTumour --out /data/MSD --folds 5 --fold 0

Checks every image/label pair; multi-modal (4D) images keep their channels. The task folder is only read.
"""

import argparse
import sys

from spark3d.data.datalist import DataError
from spark3d.data.prep import prepare_msd


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help="a TaskXX_Name folder holding dataset.json")
    parser.add_argument("--out", required=True, help="where to write <TaskXX_Name>_datalist[_foldK].json")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--fold", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        path = prepare_msd(args.task, args.out, args.val_fraction, args.seed, args.folds, args.fold)
    except DataError as err:
        print(f"msd.py: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
