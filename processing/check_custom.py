"""Check an annotation file of your own data before training on it.

    python processing/check_custom.py --annotations my_data/train.jsonl [--kind referring|semantic] [--image-root DIR]

Referring files (JSON list / JSONL of {"image", "expressions", "mask" | "masks"}) and semantic files (JSON object with
"classes" and "samples" of {"image", "label"}) are described in modeling_selfie/data/custom.py and the README. Reads
every record, image, mask (PNG, COCO polygons, RLE) and label map; prints one line per problem and a summary line,
"ok ..." with the counts when everything loads; exits with status 1 when anything is wrong.
"""

import sys

from modeling_selfie.data.registry import check_custom_main

if __name__ == "__main__":
    sys.exit(check_custom_main())
