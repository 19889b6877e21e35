#!/usr/bin/env python
"""BTCV raw layout → dataset_0.json (24 training / 6 validation cases, the standard split).

    python data_prep/btcv.py --raw /data/BTCV/RawData --out /data/BTCV

Checks every image/label pair (shape, affine, labels 0..13) and names the first bad case.
The raw data is only read.
"""

import argparse
import sys

from spark3d.data.datalist import DataError
from spark3d.data.prep import prepare_btcv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help="the BTCV RawData folder (Training/img, Training/label, Testing/img)")
    parser.add_argument("--out", required=True, help="where to write dataset_0.json")
    args = parser.parse_args(argv)
    try:
        path = prepare_btcv(args.raw, args.out)
    except DataError as err:
        print(f"btcv.py: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
