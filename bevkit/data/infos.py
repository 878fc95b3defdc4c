"""Checks of info pickles shared by the models' data checks: loading (a cut file is named, not unpickled),
the format a foreign file is in, and the paths an entry names (inside the data root, present)."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

from bevkit.data import filecheck
from bevkit.data.schema import in_root
from bevkit.data.validate import Report, missing_fix


def load_pickle(path: Path, rep: Report, fix: str):
    try:
        err = filecheck.pickle_end(path)
        if err:
            rep.add(path, err, fix)
            return None
        with open(path, 'rb') as f:
            return pickle.load(f)
    except Exception as e:    # unpickling raises many types (missing modules, truncation)
        rep.add(path, f'info file does not load ({type(e).__name__}: {e})', fix)
        return None


def describe_foreign(obj) -> str:
    """What format an info file that is not the expected one is in."""
    if isinstance(obj, dict) and ('data_list' in obj or 'metainfo' in obj):
        return ("info file is in the mmdet3d v1.x format ('data_list'/'metainfo', written by "
                "mmdetection3d >= 1.1 tools/create_data.py or update_infos_to_v2)")
    if isinstance(obj, dict) and 'infos' in obj:
        return "info file is in the mmdet3d 0.x / BEVDet format (dict with 'infos', 'metadata')"
    if isinstance(obj, list):
        return 'info file is a plain list of dicts (the BEVDepth scripts/gen_info.py format)'
    return f'info file holds a {type(obj).__name__}, not a known info format'


def check_info_paths(root: Path, stored, rep: Report, path: Path, fix: str) -> list:
    """The files one info entry names: each must be in the data root (relative to it, or absolute inside it)
    and exist. Returns the stored paths that point outside the root (reported once per info file by
    :func:`report_outside`, which names the first)."""
    outside = []
    resolve = in_root(root)
    for p in map(str, stored):
        target = resolve(p)
        if target is None:
            outside.append(p)
            continue
        if os.path.exists(target):
            continue
        tail = re.search(r'(?:^|/)((?:samples|sweeps)/.*)$', p)
        if tail and (root / tail.group(1)).exists():
            rep.add(path, f'info refers to {p}, but this data root keeps that file at {root / tail.group(1)} '
                    f'(the info file was made for another layout)', fix + ' again on this data root with --force',
                    kind=f'{path.name}: info made for another layout')
        else:
            rep.add(target, f'missing file referenced by {path.name}', missing_fix(root, p),
                    kind='missing sensor file')
    return outside


def report_outside(root: Path, outside: list, rep: Report, path: Path, fix: str) -> None:
    """One problem per info file whose entries point outside the data root (training would read another copy)."""
    if outside:
        rep.add(path, f'{len(outside)} path(s) in this info file point outside the data root {root}, the first: '
                f'{outside[0]} (training would read that copy, not this data root)',
                fix + ' again on this data root with --force (it writes paths relative to the data root, so a '
                'copied or moved root keeps working)')
