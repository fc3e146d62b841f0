"""Check that the VQAv2 (jsonl) files are where the loaders expect them.

    python processing/check_vqav2.py --root DATA_ROOT [--split train]

Looks for vqav2/vqav2_<split>.jsonl, then every record's image (relative to the data root). Prints every missing
path ("missing: <path>") and a summary line per dataset, "ok ..." with the counts when complete; exits with status 1
when anything is missing.
"""

import sys

from modeling_selfie.data.registry import check_main

if __name__ == "__main__":
    sys.exit(check_main("vqav2"))
