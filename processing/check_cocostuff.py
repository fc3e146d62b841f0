"""Check that the COCO-Stuff files are where the loaders expect them.

    python processing/check_cocostuff.py --root DATA_ROOT [--split train]

Looks for cocostuff/<split>2017/ (label maps) and coco/<split>2017/, then every label map's image. Prints every
missing path ("missing: <path>") and a summary line per dataset, "ok ..." with the counts when complete; exits with
status 1 when anything is missing.
"""

import sys

from modeling_selfie.data.registry import check_main

if __name__ == "__main__":
    sys.exit(check_main("cocostuff"))
