"""Cheap integrity checks of single data files: each reads a few bytes, a size or a directory, never decodes.

The data check (:mod:`bevkit.data.validate`) runs them on *every* file of a data root by default, because a
truncated file is found by its end (a JPEG without its end-of-image marker, a zip archive without its central
directory, a pickle without its STOP opcode) or by its size (lidar points of 5 float32, depth triples of 3);
decoding (``--full``, or a sample of each kind by default) finds what these cannot (damage in the middle).

Each function returns '' when the file looks whole, else one short sentence saying what is wrong. A missing
file raises FileNotFoundError (the caller words that, since the fix depends on who owns the file).
"""
from __future__ import annotations

import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, List, Sequence

#: Threads for checking many files: each check waits on the disk (open, one read), not on the CPU, so threads
#: overlap those waits on a cold page cache or a network file system (the GIL is released while waiting).
WORKERS = 16
JPEG_SOI = b'\xff\xd8'
JPEG_EOI = b'\xff\xd9'
#: Bytes read from a JPEG's end: writers may pad after the end-of-image marker with a few NUL bytes.
JPEG_TAIL = 16
LIDAR_POINT_BYTES = 5 * 4      # nuScenes .pcd.bin: x, y, z, intensity, ring index as float32
DEPTH_ROW_BYTES = 3 * 4        # bevkit depth_gt/*.bin: u, v, depth as float32
PICKLE_STOP = b'.'


def jpeg(path: Path) -> str:
    """Start-of-image marker first, end-of-image marker last (a cut file lacks the latter)."""
    with open(path, 'rb') as f:
        head = f.read(2)
        size = os.fstat(f.fileno()).st_size
        f.seek(max(size - JPEG_TAIL, 0))
        tail = f.read().rstrip(b'\x00')
    if head != JPEG_SOI:
        return f'not a JPEG file ({size} bytes, no start-of-image marker)'
    if not tail.endswith(JPEG_EOI):
        return f'truncated image: {size} bytes and no JPEG end-of-image marker'
    return ''


def sized(path: Path, unit: int, what: str) -> str:
    """A binary file of whole records of ``unit`` bytes (at least one)."""
    size = os.stat(path).st_size
    if size == 0 or size % unit:
        return f'truncated {what} file: {size} bytes is not a whole number of {unit}-byte records'
    return ''


def lidar(path: Path) -> str:
    return sized(path, LIDAR_POINT_BYTES, 'lidar')


def npz(path: Path, members: Iterable[str], min_member_bytes: int, holds: str = '') -> str:
    """A numpy .npz (a zip archive): its central directory reads (a cut archive has none), it lists ``members``
    (``name`` for ``name.npy``), each at least ``min_member_bytes`` uncompressed (``holds``: what that size is
    for, in the message), and every member's data lies inside the file."""
    size = os.stat(path).st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = {i.filename: i for i in z.infolist()}
    except zipfile.BadZipFile as e:
        return f'truncated or damaged .npz ({size} bytes: {e})'
    missing = [m for m in members if f'{m}.npy' not in infos]
    if missing:
        return f'.npz lacks {missing} (has {sorted(n[:-4] for n in infos)})'
    for name, info in infos.items():
        if info.header_offset + info.compress_size > size:
            return f'truncated .npz: member {name} ends past the end of the file ({size} bytes)'
    small = [m for m in members if infos[f'{m}.npy'].file_size < min_member_bytes]
    if small:
        return f'.npz members {small} are too small to hold {holds or f"{min_member_bytes} bytes"}'
    return ''


def pickle_end(path: Path) -> str:
    """Every pickle ends with the STOP opcode; a cut one does not (checked before loading a large file)."""
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(size - 1, 0))
        last = f.read(1)
    if last != PICKLE_STOP:
        return f'truncated pickle: {size} bytes and no STOP opcode at the end'
    return ''


def each(check: Callable[[Any], Any], items: Sequence, workers: int = WORKERS) -> List[Any]:
    """``check(item)`` for every item, in order, over ``workers`` threads (contiguous chunks: little overhead per
    file). An exception a check raises is returned in its place (e.g. FileNotFoundError for a missing file)."""
    def run(chunk):
        out = []
        for item in chunk:
            try:
                out.append(check(item))
            except Exception as e:  # the caller words each kind of failure
                out.append(e)
        return out

    items = list(items)
    if workers <= 1 or len(items) < 2 * workers:
        return run(items)
    size = -(-len(items) // workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(run, [items[i:i + size] for i in range(0, len(items), size)]))
    return [r for part in parts for r in part]
