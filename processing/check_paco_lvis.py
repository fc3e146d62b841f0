"""Check that the PACO-LVIS files are where the loaders expect them.

    python processing/check_paco_lvis.py --root DATA_ROOT [--split train]

Looks for vlpart/paco/annotations/paco_lvis_v1_<split>.json and coco/, then the annotated images. Prints every
missing path ("missing: <path>") and a summary line per dataset, "ok ..." with the counts when complete; exits with
status 1 when anything is missing.
"""

import sys

from modeling_selfie.data.registry import check_main

if __name__ == "__main__":
    sys.exit(check_main("paco_lvis"))
