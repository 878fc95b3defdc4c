"""Decode errors in the models' data loaders that name the file and the sample.

PIL opens images lazily: a damaged JPEG fails later, inside a transform, with ``OSError: image file is
truncated`` and no file name. The runtime patches of each model (listed in their patch sets) put two things in
place:

- :class:`CheckedImage` stands in for ``PIL.Image`` inside the dataset module: the image it opens stays lazy
  (JPEG draft mode, ``BEVKIT_JPEG_DRAFT``, needs an image not yet decoded), but a failure to open or to decode it,
  whenever that happens, becomes :class:`SampleFileError` naming the file;
- :func:`naming_sample` wraps the dataset's ``__getitem__`` so that error also names the sample token.

The launcher finds the message in ``train.log`` and prints it as the run's last error line
(:func:`find_in_log`).
"""
from __future__ import annotations

import functools
import re
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

#: Start of every message, so the launcher can find it in a worker's traceback.
PREFIX = "damaged data file: "


class SampleFileError(OSError):
    """A data file a sample needs cannot be read. One message argument (DataLoader workers re-raise the type with
    the formatted traceback as its only argument)."""


class CheckedImage:
    """``PIL.Image`` for one dataset module, whose ``open`` gives the same lazy image object, with its ``load`` (what
    PIL calls before it reads pixels) turning a decode failure into :class:`SampleFileError` naming the file."""

    def __init__(self, image_module: Any):
        self._image = image_module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._image, name)

    def open(self, fp, *args, **kwargs):
        try:
            img = self._image.open(fp, *args, **kwargs)
        except DECODE_ERRORS as e:
            raise SampleFileError(f"{PREFIX}{fp}: {type(e).__name__}: {e}") from e
        img.load = _naming_load(img, fp)
        return img


#: What PIL raises for a missing, cut or damaged file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def _naming_load(img: Any, name: Any) -> Callable[[], Any]:
    """``img.load`` that names the file when decoding fails. A weak reference, so that the image does not hold
    itself in a cycle (its pixel buffer is freed when the pipeline drops it, not at the next garbage collection)."""
    load, ref = type(img).load, weakref.ref(img)

    def checked_load():
        try:
            return load(ref())
        except SampleFileError:
            raise
        except DECODE_ERRORS as e:
            raise SampleFileError(f"{PREFIX}{name}: {type(e).__name__}: {e}") from e

    return checked_load


def checked_image(original: Any) -> CheckedImage:
    """Patch builder: the dataset module's ``Image`` becomes a :class:`CheckedImage`."""
    return CheckedImage(original)


def naming_sample(model: str, token_of: Callable[[Any, int], Optional[str]]):
    """Patch builder for a dataset's ``__getitem__``: a :class:`SampleFileError` raised while loading sample
    ``idx`` gets the sample token and the fix appended."""

    def build(original):
        @functools.wraps(original)
        def __getitem__(self, idx):
            try:
                return original(self, idx)
            except SampleFileError as e:
                if "(sample " in str(e):
                    raise
                try:
                    token = token_of(self, idx)
                except Exception:  # the message must not fail on a dataset that looks different
                    token = None
                raise SampleFileError(
                    f"{e} (sample {token or '?'}): restore the file from the dataset download; "
                    f"`python -m bevkit.data.validate --model {model} DATA_ROOT --full` lists every damaged "
                    f"file") from e.__cause__
        return __getitem__

    return build


def find_in_log(log_path: Path, tail_bytes: int = 1 << 20) -> Optional[str]:
    """The last damaged-data message in (the end of) a training log, or None."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(f.tell() - tail_bytes, 0))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    found = re.findall(re.escape(PREFIX) + r"[^\r\n]*", text)
    return found[-1] if found else None
