"""Check that the PASCAL-Part files are where the loaders expect them.

    python processing/check_pascal_part.py --root DATA_ROOT [--split train]

Looks for vlpart/pascal_part/<split>.json and vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/, then the annotated
images. Prints every missing path ("missing: <path>") and a summary line per dataset, "ok ..." with the counts when
complete; exits with status 1 when anything is missing.
"""

import sys

from modeling_selfie.data.registry import check_main

if __name__ == "__main__":
    sys.exit(check_main("pascal_part"))
