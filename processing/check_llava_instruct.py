"""Check that the LLaVA-Instruct-150k files are where the loaders expect them.

    python processing/check_llava_instruct.py --root DATA_ROOT

Looks for llava_dataset/llava_instruct_150k.json and coco/train2017/, then every record's image. Prints every
missing path ("missing: <path>") and a summary line per dataset, "ok ..." with the counts when complete; exits with
status 1 when anything is missing.
"""

import sys

from modeling_selfie.data.registry import check_main

if __name__ == "__main__":
    sys.exit(check_main("llava_instruct"))
