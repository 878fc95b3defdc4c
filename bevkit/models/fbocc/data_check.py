"""FB-OCC's part of the data check (:mod:`bevkit.data.validate`): Occ3D labels and the info files made by
FB-BEV's converter (``python -m bevkit.models.fbocc.prepare``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bevkit.data import filecheck
from bevkit.data.schema import (CAMERAS, FBOCC_CAM_KEYS, FBOCC_INFO_FILES, FBOCC_INFO_KEYS, OCC_FREE, OCC_KEYS,
                                OCC_SHAPE, TRAINVAL, in_root)
from bevkit.data.infos import check_info_paths, describe_foreign, load_pickle, report_outside
from bevkit.data.validate import FAST_SAMPLES, Report, check_all, missing_fix, regen_fix, sample
from bevkit.models.fbocc.prepare import info_path_fields

#: How the model prepares its info files (the model README holds the exact commands).
PREPARE_HINT = "run the FB-OCC data preparation (see fbocc/README.md, 'Data')"
#: FB-OCC splits every train scene into 2 sequence groups.
MIN_SAMPLES_PER_SCENE = 2
NEEDS_TEST_TABLES = False
SCENE_NEED = 'FB-OCC splits every scene into 2 sequence groups and needs >= 2'


def check(root: Path, tables: dict, full: bool, rep: Report) -> None:
    _check_occ(root, tables, full, rep)
    _check_fbocc_infos(root, tables, full, rep)


def _check_occ_file(path: Path, full: bool) -> str:
    try:
        with np.load(path) as z:
            missing = [k for k in OCC_KEYS if k not in z.files]
            if missing:
                return f'labels.npz lacks {missing} (has {sorted(z.files)})'
            for k in OCC_KEYS:
                a = z[k]
                if a.shape != OCC_SHAPE:
                    return f'{k} has shape {a.shape}, expected {OCC_SHAPE} indexed [x,y,z]'
                if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
                    return f'{k} has dtype {a.dtype}, expected uint8'
                if full or k == 'semantics':
                    if k == 'semantics' and (a.min() < 0 or a.max() > OCC_FREE):
                        return f'semantics holds ids outside 0..{OCC_FREE}'
                    if k != 'semantics' and a.max() > 1:
                        return f'{k} holds values other than 0/1'
    except Exception as e:    # zipfile / numpy raise many types for broken files
        return f'unreadable labels.npz ({type(e).__name__}: {e})'
    return ''


def _check_occ(root: Path, t: dict, full: bool, rep: Report):
    if t.get('scene') is None or t.get('sample') is None:
        return
    from nuscenes.utils import splits
    wanted = set(splits.train) | set(splits.val)
    scenes = {sc['token']: sc['name'] for sc in t['scene'] if sc['name'] in wanted}
    pairs = [(scenes[s['scene_token']], s['token']) for s in t['sample'] if s['scene_token'] in scenes]
    gts = root / 'gts'
    if not gts.is_dir():
        rep.add(gts, 'no Occ3D ground truth folder (gts/<scene>/<sample_token>/labels.npz)',
                f'download Occ3D-nuScenes and put (or symlink) its gts/ folder at {gts}')
        return
    decode = set(sample(pairs, FAST_SAMPLES, full))
    voxels = int(np.prod(OCC_SHAPE))

    def check(pair):  # every file: its zip directory (cheap); a sample (all with --full): decoded
        path = gts / pair[0] / pair[1] / 'labels.npz'
        return (filecheck.npz(path, OCC_KEYS, voxels, f'the {OCC_SHAPE} voxel grid')
                or (_check_occ_file(path, full) if pair in decode else ''))

    for (scene, tok), err in zip(pairs, check_all(check, pairs, 'Occ3D labels', full)):
        path = gts / scene / tok / 'labels.npz'
        if isinstance(err, FileNotFoundError):
            fix = missing_fix(root, f'gts/{scene}/{tok}/labels.npz', 'the Occ3D-nuScenes download')
            rep.add(path, 'missing Occ3D labels for a train/val sample', fix, kind='missing Occ3D labels')
            continue
        if isinstance(err, Exception):
            err = f'unreadable labels.npz ({type(err).__name__}: {err})'
        if err:
            rep.add(path, err, regen_fix(root, 'the Occ3D gts/ folder'), kind=err.split(' (')[0])


def _check_fbocc_infos(root: Path, t: dict, full: bool, rep: Report):
    fix = PREPARE_HINT
    sample_tokens = {s['token'] for s in t['sample']} if t.get('sample') is not None else None
    for name in FBOCC_INFO_FILES:
        path = root / name
        if not path.is_file():
            rep.add(path, 'missing FB-OCC info file', fix)
            continue
        obj = load_pickle(path, rep, fix)
        if obj is None:
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get('infos'), list) and 'metadata' in obj):
            rep.add(path, describe_foreign(obj) + "; FB-OCC needs {'infos': [...], 'metadata': "
                    "{'version': 'v1.0-trainval'}} from FB-BEV tools/create_data_bevdet.py", fix)
            continue
        infos = obj['infos']
        if not infos:
            rep.add(path, 'info file holds no samples', fix + ' (are the scene names real split names?)')
            continue
        for info in sample(infos, FAST_SAMPLES, full):
            missing = [k for k in FBOCC_INFO_KEYS if k not in info]
            if missing:
                hint = ''
                if {'ann_infos', 'scene_name', 'occ_path'} & set(missing):
                    hint = " (made by mmdet3d's converter without FB-BEV's add_ann_adj_info step)"
                rep.add(path, f'info lacks keys {missing}{hint}', fix, kind=f'{name}: info lacks keys')
                break
            cams = info.get('cams', {})
            bad = [c for c in CAMERAS if c not in cams or any(k not in cams[c] for k in FBOCC_CAM_KEYS)]
            if bad:
                rep.add(path, f"info 'cams' lacks cameras or keys for {bad}", fix,
                        kind=f'{name}: cams incomplete')
                break
            if not (isinstance(info['ann_infos'], (tuple, list)) and len(info['ann_infos']) == 2):
                rep.add(path, "info 'ann_infos' is not the (boxes, labels) pair of "
                        "create_data_bevdet.py", fix, kind=f'{name}: ann_infos format')
                break
            if sample_tokens is not None and info['token'] not in sample_tokens:
                rep.add(path, f'info token {info["token"]} is not in {TRAINVAL}/sample.json (the '
                        f'file was made for another dataset or an earlier generation)',
                        fix + ' again on this data root', kind=f'{name}: stale tokens')
                break
            check_info_paths(root, [n[k] for n, k in info_path_fields(info)], rep, path, fix)
        else:  # the entries are well formed: every one must point into this data root (a string check)
            resolve = in_root(root)
            outside = [n[k] for info in infos for n, k in info_path_fields(info) if resolve(n[k]) is None]
            report_outside(root, outside, rep, path, fix)
