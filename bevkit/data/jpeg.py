"""Opt-in JPEG draft decoding (``BEVKIT_JPEG_DRAFT=1``) for both models' camera pipelines.

Both pipelines open each 1600x900 camera JPEG with PIL and resize it to about 0.38-0.55 of its size before
cropping. PIL's draft mode (``Image.draft``) lets libjpeg decode at a reduced DCT scale (1/2, 1/4, 1/8) that is
still at least the requested size, so most images are decoded at 800x450 and resized from there: about half
the decode and resize work. The pixels differ slightly from a full decode followed by the resize (the DCT
scaling is a box-like prefilter): the PSNR after the pipeline's resize is printed by
``python -m bevkit.models.bevdepth.bench_data`` (bevdepth/README.md). Off by default, because it changes the
input the model sees.
"""
from __future__ import annotations

from bevkit import env

ENV = "BEVKIT_JPEG_DRAFT"


def enabled() -> bool:
    """BEVKIT_JPEG_DRAFT=1 (on) / 0 or unset (off); anything else is one clear error."""
    value = env.get(ENV)
    if value not in (None, "0", "1"):
        raise ValueError(f"{ENV}={value!r}: use 1 (decode camera JPEGs at reduced scale) or 0 (full decode)")
    return value == "1"


def draft(img, size):
    """Ask PIL to decode a not-yet-loaded JPEG at the smallest DCT scale that still gives at least ``size``
    (width, height); other images, and images already decoded, are left as they are."""
    if getattr(img, "format", None) == "JPEG" and getattr(img, "tile", None):
        img.draft("RGB", (int(size[0]), int(size[1])))
    return img
