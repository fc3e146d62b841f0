"""Stand-in for transformers' `utils/fetch_hub_objects_for_ci.py` (not in the release's source distribution).

CI has no Hub access: image URLs map to a PNG written here with PIL; other URLs are returned unchanged."""

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def url_to_local_path(url: str) -> str:
    if not url.lower().endswith(IMAGE_SUFFIXES):
        return url
    path = Path(__file__).parent / ("image_" + Path(url).stem + ".png")
    if not path.exists():
        pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    return str(path)
