"""BEVDepth's part of the data check (:mod:`bevkit.data.validate`): the info files of its gen_info script and
the precomputed depth ground truth (``python -m bevkit.models.bevdepth.prepare``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bevkit.data import filecheck
from bevkit.data.schema import (BEVDEPTH_ANN_KEYS, BEVDEPTH_CAM_KEYS, BEVDEPTH_INFO_FILES, BEVDEPTH_INFO_KEYS,
                                CAMERAS, TRAINVAL, in_root)
from bevkit.data.infos import check_info_paths, describe_foreign, load_pickle, report_outside
from bevkit.data.validate import FAST_SAMPLES, Report, check_all, sample

PREPARE_HINT = "run the BEVDepth data preparation (see bevdepth/README.md, 'Data')"
MIN_SAMPLES_PER_SCENE = 1
#: BEVDepth's scripts/gen_info.py loads v1.0-test too.
NEEDS_TEST_TABLES = True
TEST_TABLES_WHY = 'BEVDepth scripts/gen_info.py loads it'
SCENE_NEED = 'BEVDepth needs >= 1'


def check(root: Path, tables: dict, full: bool, rep: Report) -> None:
    _check_bevdepth_infos(root, tables, full, rep)
    _check_depth_gt(root, tables, full, rep)


def _check_bevdepth_infos(root: Path, t: dict, full: bool, rep: Report):
    fix = PREPARE_HINT
    sample_tokens = {s['token'] for s in t['sample']} if t.get('sample') is not None else None
    for name in BEVDEPTH_INFO_FILES:
        path = root / name
        if not path.is_file():
            rep.add(path, 'missing BEVDepth info file', fix)
            continue
        obj = load_pickle(path, rep, fix)
        if obj is None:
            continue
        if not isinstance(obj, list):
            rep.add(path, describe_foreign(obj) + '; BEVDepth needs the plain list written by its '
                    'scripts/gen_info.py', fix)
            continue
        if not obj:
            rep.add(path, 'info file holds no samples', fix + ' (are the scene names real split names?)')
            continue
        for info in sample(obj, FAST_SAMPLES, full):
            if not isinstance(info, dict):
                rep.add(path, f'info entries are {type(info).__name__}, not dicts', fix)
                break
            missing = [k for k in BEVDEPTH_INFO_KEYS if k not in info]
            if missing:
                rep.add(path, f'info lacks keys {missing}', fix, kind=f'{name}: info lacks keys')
                break
            cams = info['cam_infos']
            bad = [c for c in CAMERAS if c not in cams or any(k not in cams[c] for k in BEVDEPTH_CAM_KEYS)]
            if bad:
                rep.add(path, f"info 'cam_infos' lacks cameras or keys for {bad}", fix,
                        kind=f'{name}: cam_infos incomplete')
                break
            anns = info['ann_infos']
            if anns and any(k not in anns[0] for k in BEVDEPTH_ANN_KEYS):
                rep.add(path, f"info 'ann_infos' records lack some of {list(BEVDEPTH_ANN_KEYS)}", fix,
                        kind=f'{name}: ann_infos incomplete')
                break
            if sample_tokens is not None and info['sample_token'] not in sample_tokens:
                rep.add(path, f'info token {info["sample_token"]} is not in {TRAINVAL}/sample.json '
                        f'(the file was made for another dataset or an earlier generation)',
                        fix + ' again on this data root', kind=f'{name}: stale tokens')
                break
            check_info_paths(root, info_paths(info), rep, path, fix)
        else:  # the entries are well formed: every one must point into this data root (a string check)
            resolve = in_root(root)
            outside = [p for info in obj for p in info_paths(info) if resolve(p) is None]
            report_outside(root, outside, rep, path, fix)


def info_paths(info: dict) -> list:
    """Every file one BEVDepth info entry names (key frame and sweeps, cameras and lidar): its dataset joins
    them with the data root."""
    frames = [info.get('cam_infos') or {}, info.get('lidar_infos') or {}]
    frames += list(info.get('cam_sweeps') or []) + list(info.get('lidar_sweeps') or [])
    return [rec['filename'] for frame in frames if isinstance(frame, dict)
            for rec in frame.values() if isinstance(rec, dict) and 'filename' in rec]


def _check_depth_gt(root: Path, t: dict, full: bool, rep: Report):
    """BEVDepth NPU-style precomputed depth: depth_gt/<image basename>.bin, float32 (N,3)."""
    folder = root / 'depth_gt'
    if not folder.is_dir():
        return
    fix = "regenerate depth_gt (see bevdepth/README.md, 'Data')"
    files = sorted(folder.glob('*.bin'))
    if not files:
        rep.add(folder, 'depth_gt/ holds no .bin files', fix)
        return
    def check(path):  # every file: its size (an image may hold no point: 0 bytes); --full: the values
        size = path.stat().st_size
        if size % filecheck.DEPTH_ROW_BYTES:
            return (f'truncated depth_gt file: {size} bytes is not a whole number of (u, v, depth) float32 '
                    f'triples')
        if full and size:
            d = np.fromfile(path, dtype='<f4').reshape(-1, 3)
            if not np.isfinite(d).all() or (d[:, 2] <= 0).any():
                return 'depth_gt holds non-finite or non-positive depths'
        return ''

    for path, err in zip(files, check_all(check, files, 'depth_gt', full)):
        if isinstance(err, Exception):
            err = f'unreadable depth_gt file ({type(err).__name__}: {err})'
        if err:
            rep.add(path, err, fix, kind=err.split(':')[0].split(' (')[0])
    # every camera keyframe of the train split should have one (the NPU port reads them in training)
    if t.get('sample_data') is not None and t.get('scene') is not None and t.get('sample') is not None:
        from nuscenes.utils import splits
        train = {sc['token'] for sc in t['scene'] if sc['name'] in set(splits.train)}
        train_samples = {s['token'] for s in t['sample'] if s['scene_token'] in train}
        have = {p.name for p in files}
        wanted = [Path(r['filename']).name + '.bin' for r in t['sample_data']
                  if r.get('is_key_frame') and r['filename'].endswith('.jpg')
                  and r['sample_token'] in train_samples]
        for w in wanted:  # a set lookup each: all of them
            if w not in have:
                rep.add(folder / w, 'missing depth_gt for a train camera keyframe', fix,
                        kind='missing depth_gt')
