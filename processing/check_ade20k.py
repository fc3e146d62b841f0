"""Check that the ADE20K files are where the loaders expect them.

    python processing/check_ade20k.py --root DATA_ROOT [--split train]

Looks for ADEChallengeData2016/{images,annotations}/<training|validation>/, then every image's annotation .png.
Prints every missing path ("missing: <path>") and a summary line per dataset, "ok ..." with the counts when
complete; exits with status 1 when anything is missing.
"""

import sys

from modeling_selfie.data.registry import check_main

if __name__ == "__main__":
    sys.exit(check_main("ade20k"))
