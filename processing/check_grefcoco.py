"""Check that the gRefCOCO files are where the loaders expect them.

    python processing/check_grefcoco.py --root DATA_ROOT [--split train]

Looks for refer_seg/grefcoco/grefs(unc).json, refer_seg/grefcoco/instances.json and
refer_seg/images/mscoco/images/train2014, then the split's images. Prints every missing path ("missing: <path>") and
a summary line per dataset, "ok ..." with the counts when complete; exits with status 1 when anything is missing.
"""

import sys

from modeling_selfie.data.registry import check_main

if __name__ == "__main__":
    sys.exit(check_main("grefcoco"))
