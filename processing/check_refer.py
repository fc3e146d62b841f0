"""Check that the RefCOCO, RefCOCO+, RefCOCOg and refCLEF files are where the loaders expect them.

    python processing/check_refer.py --root DATA_ROOT [--dataset refcoco] [--split train] [--split-by unc]

Looks for refer_seg/<dataset>/refs(<split-by>).p, refer_seg/<dataset>/instances.json and the image folder
(refer_seg/images/mscoco/images/train2014, refer_seg/images/saiapr_tc-12 for refCLEF), then the split's images.
Prints every missing path ("missing: <path>") and a summary line per dataset, "ok ..." with the counts when
complete; exits with status 1 when anything is missing.
"""

import sys

from modeling_selfie.data.registry import check_main

if __name__ == "__main__":
    sys.exit(check_main("refer"))
