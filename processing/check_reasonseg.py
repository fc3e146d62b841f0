"""Check that the ReasonSeg files are where the loaders expect them.

    python processing/check_reasonseg.py --root DATA_ROOT [--split train]

Looks for reason_seg/ReasonSeg/<split>/, then every image's .json. Prints every missing path ("missing: <path>") and
a summary line per dataset, "ok ..." with the counts when complete; exits with status 1 when anything is missing.
"""

import sys

from modeling_selfie.data.registry import check_main

if __name__ == "__main__":
    sys.exit(check_main("reasonseg"))
