"""Check a nuScenes-format data root before training FB-OCC or BEVDepth.

    python -m bevkit.data.validate --model {fbocc,bevdepth} DATA_ROOT [--full]

Checks the nuScenes tables, the files they reference (camera JPEGs, LIDAR_TOP .pcd.bin), the
Occ3D labels (FB-OCC), the info pickles written by the model's data preparation, and BEVDepth's
depth_gt/ files. The fast mode (default) reads a sample of the files; --full reads all of them.
Every problem names a file and a one-line fix; the exit status is 1 when there are problems.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .schema import (BEVDEPTH_ANN_KEYS, BEVDEPTH_CAM_KEYS, BEVDEPTH_INFO_FILES,
                     BEVDEPTH_INFO_KEYS, CAMERAS, FBOCC_CAM_KEYS, FBOCC_INFO_FILES,
                     FBOCC_INFO_KEYS, LIDAR, OCC_KEYS, OCC_SHAPE, OCC_FREE, TABLE_FIELDS, TABLES,
                     TEST, TRAINVAL)

MODELS = ('fbocc', 'bevdepth')
#: How each model prepares its info files (the model READMEs hold the exact commands).
PREPARE_HINT = {
    'fbocc': "run the FB-OCC data preparation (see fbocc/README.md, 'Data')",
    'bevdepth': "run the BEVDepth data preparation (see bevdepth/README.md, 'Data')",
}
GENERATE_HINT = 'python -m bevkit.data.synthetic --out DIR'
#: Fast mode: files checked per kind (images, lidar, Occ3D labels, depth GT, info records).
FAST_SAMPLES = 24
#: Tables larger than this are not parsed in fast mode (the real trainval tables are GBs).
FAST_TABLE_BYTES = 100 * 2**20
#: Report at most this many problems of one kind individually, then one summary line.
MAX_PER_KIND = 5


@dataclass
class Problem:
    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f'{self.path}: {self.message}\n    fix: {self.fix}'


class _Report:
    """Collects problems; reports at most MAX_PER_KIND of one kind, then one summary line."""

    def __init__(self):
        self.problems = []
        self._counts = {}
        self._fixes = {}

    def add(self, path, message, fix, kind=None):
        kind = kind or message
        n = self._counts.get(kind, 0) + 1
        self._counts[kind] = n
        self._fixes[kind] = fix
        if n <= MAX_PER_KIND:
            self.problems.append(Problem(str(path), message, fix))

    def finish(self) -> list:
        for kind, n in self._counts.items():
            if n > MAX_PER_KIND:
                self.problems.append(Problem('(more)', f'{n - MAX_PER_KIND} more like: {kind}',
                                             self._fixes[kind]))
        return self.problems


def _regen_fix(root: Path, what: str) -> str:
    if (root / 'SYNTHETIC.json').exists():
        return f'regenerate the synthetic dataset: python -m bevkit.data.synthetic --out {root} --overwrite'
    return f're-extract {what} from the nuScenes download into {root}'


def _sample(items, k, full):
    items = list(items)
    if full or len(items) <= k:
        return items
    return random.Random(0).sample(items, k)


def _progress(items, desc, full):
    if not full:
        return items
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, unit='file', file=sys.stderr, leave=False)
    except ImportError:      # tqdm comes with the devkit; the validator still works without it
        return items


# ---- data root ------------------------------------------------------------------------------
def _find_root_candidates(root: Path):
    """Folders below root (2 levels) that hold a v1.0-trainval folder."""
    found = []
    try:
        for a in sorted(root.iterdir()):
            if not a.is_dir():
                continue
            if (a / TRAINVAL).is_dir():
                found.append(a)
            else:
                try:
                    found += [b for b in sorted(a.iterdir()) if (b / TRAINVAL).is_dir()]
                except OSError:
                    pass
    except OSError:
        pass
    return found


def _check_root(root: Path, rep: _Report) -> bool:
    if not root.exists():
        rep.add(root, 'data root does not exist',
                f'pass the folder that holds {TRAINVAL}/ and samples/, or create one: {GENERATE_HINT}')
        return False
    if not root.is_dir():
        rep.add(root, 'data root is not a folder', f'pass the folder that holds {TRAINVAL}/')
        return False
    if (root / TRAINVAL).is_dir():
        return True
    if root.name.startswith('v1.0-') or (root / 'sample.json').exists():
        rep.add(root, 'this is a table folder, not the data root',
                f'did you mean {root.parent}? pass the folder that holds {root.name}/ and samples/')
        return False
    cands = _find_root_candidates(root)
    if cands:
        rep.add(root / TRAINVAL, f'no {TRAINVAL} here', f'did you mean {cands[0]}? '
                f'pass the folder that holds {TRAINVAL}/ and samples/')
    else:
        rep.add(root / TRAINVAL, f'no {TRAINVAL} here (not a nuScenes data root)',
                f'download nuScenes v1.0-trainval into {root}, or generate a synthetic one: '
                f'{GENERATE_HINT}')
    return False


# ---- tables ------------------------------------------------------------------------------------
_BIG = ('sample_data', 'sample_annotation', 'ego_pose', 'instance')


def _load_tables(root: Path, version: str, full: bool, rep: _Report) -> dict:
    """Loaded tables (big ones may be None in fast mode); records checked for required fields."""
    folder = root / version
    tables = {}
    fix_tables = _regen_fix(root, f'the {version} metadata')
    for name in TABLES:
        path = folder / f'{name}.json'
        if not path.exists():
            rep.add(path, f'missing table {name}.json', fix_tables, kind='missing table')
            continue
        size = path.stat().st_size
        if name in _BIG and not full and size > FAST_TABLE_BYTES:
            with open(path, 'rb') as f:
                head = f.read(64).lstrip()
                f.seek(max(size - 64, 0))
                tail = f.read().rstrip()
            if not head.startswith(b'[') or not tail.endswith(b']'):
                rep.add(path, f'{name}.json is truncated or not a JSON list', fix_tables)
            tables[name] = None      # too big for the fast mode
            continue
        try:
            with open(path) as f:
                records = json.load(f)
        except (ValueError, OSError) as e:
            rep.add(path, f'{name}.json does not load: {e}', fix_tables)
            continue
        if not isinstance(records, list):
            rep.add(path, f'{name}.json is not a JSON list', fix_tables)
            continue
        if name == 'map' and not records:
            rep.add(path, 'map.json is empty (the devkit needs >= 1 map record)', fix_tables)
        need = TABLE_FIELDS[name]
        for rec in records if (full or len(records) < 100000) else records[:1000]:
            missing = [k for k in need if k not in rec]
            if missing:
                rep.add(path, f'{name} record {rec.get("token", "?")} lacks {missing}', fix_tables,
                        kind=f'{name} records lack fields')
                break
        tables[name] = records
    for extra in ('lidarseg', 'panoptic'):
        path = folder / f'{extra}.json'
        if path.exists() and not (root / extra / version).is_dir():
            rep.add(path, f'{extra}.json present but no {extra}/{version}/ label files: the devkit '
                    f'then fails to load', f'remove {path} or add the {extra} label files')
    return tables


def _check_integrity(root: Path, version: str, t: dict, model: str, rep: _Report):
    """Cross-table facts the devkit, the converters and the pipelines rely on."""
    folder = root / version
    if t.get('map') is not None and t.get('log') is not None:
        mapped = {lt for m in t['map'] for lt in m.get('log_tokens', [])}
        for log in t['log']:
            if log['token'] not in mapped:
                rep.add(folder / 'map.json', f'log {log["token"]} is in no map record\'s log_tokens '
                        f'(the devkit fails to load)', _regen_fix(root, 'map.json'),
                        kind='log without map')
        for m in t['map']:
            if not (root / m.get('filename', '')).is_file():
                rep.add(root / m.get('filename', 'maps/?'), 'map image missing',
                        _regen_fix(root, 'the maps/ folder'), kind='map image missing')
    if t.get('scene') is None or t.get('sample') is None:
        return
    samples = {s['token']: s for s in t['sample']}
    by_scene = {}
    for s in t['sample']:
        by_scene.setdefault(s['scene_token'], []).append(s)
    if version == TRAINVAL:
        from nuscenes.utils import splits
        names = {sc['name'] for sc in t['scene']}
        for split in ('train', 'val'):
            if not names & set(getattr(splits, split)):
                rep.add(folder / 'scene.json', f'no scene named like the nuScenes {split} split '
                        f'(the converters select scenes by name from nuscenes.utils.splits)',
                        f'name scenes after splits.{split} (the synthetic generator does)')
    spans = []
    for sc in t['scene']:
        recs = sorted(by_scene.get(sc['token'], []), key=lambda s: s['timestamp'])
        if sc['first_sample_token'] not in samples:
            rep.add(folder / 'scene.json', f'scene {sc["name"]}: first_sample_token not in sample.json',
                    _regen_fix(root, 'the metadata'), kind='scene first sample missing')
            continue
        if model == 'fbocc' and version == TRAINVAL and len(recs) < 2:
            rep.add(folder / 'scene.json', f'scene {sc["name"]} has {len(recs)} sample(s); FB-OCC '
                    f'splits every scene into 2 sequence groups and needs >= 2',
                    'give every scene >= 2 samples (--samples-per-scene)', kind='short scene')
        if recs:
            spans.append((recs[0]['timestamp'], recs[-1]['timestamp'], sc['name']))
    spans.sort()
    for (a0, a1, na), (b0, b1, nb) in zip(spans, spans[1:]):
        if b0 <= a1:
            rep.add(folder / 'sample.json', f'scenes {na} and {nb} overlap in time; FB-OCC sorts all '
                    f'samples by timestamp and would mix their sequences',
                    'give each scene a disjoint time range', kind='scenes overlap')


def _keyframe_files(root: Path, version: str, t: dict, rep: _Report) -> list:
    """(relative filename, sample_data record or None) of every keyframe file."""
    sd = t.get('sample_data')
    if sd is not None:
        return [(r['filename'], r) for r in sd if r.get('is_key_frame')]
    # fast mode on a big table: keyframe files live under samples/ (sweeps/ holds the rest)
    path = root / version / 'sample_data.json'
    if not path.exists():
        return []
    with open(path, 'rb') as f:
        text = f.read()
    return [(m.decode(), None) for m in re.findall(rb'"filename":\s*"(samples/[^"]+)"', text)]


def _check_image(path: Path, rec, full) -> str:
    from PIL import Image
    try:
        with Image.open(path) as im:
            size = im.size
            if full:
                im.load()
            else:
                im.verify()
    except Exception as e:   # PIL raises many types for broken files
        return f'unreadable image ({type(e).__name__}: {e})'
    if rec is not None and rec.get('width') and (rec['width'], rec['height']) != size:
        return f'image is {size[0]}x{size[1]}, sample_data says {rec["width"]}x{rec["height"]}'
    return ''


def _check_lidar(path: Path, full) -> str:
    size = path.stat().st_size
    if size == 0 or size % 20:
        return (f'truncated lidar file: {size} bytes is not a whole number of points '
                f'(float32 x 5 = 20 bytes each)')
    if full:
        pts = np.fromfile(path, dtype='<f4').reshape(-1, 5)
        if not np.isfinite(pts).all():
            return 'lidar file holds NaN/inf values'
    return ''


def _check_files(root: Path, files: list, full: bool, rep: _Report):
    cams = [f for f in files if f[0].endswith(('.jpg', '.jpeg', '.png'))]
    lidar = [f for f in files if f[0].endswith('.bin')]
    if not cams:
        rep.add(root / 'samples', 'no camera keyframes referenced by sample_data.json',
                _regen_fix(root, 'the metadata'))
    if not lidar:
        rep.add(root / 'samples' / LIDAR, 'no LIDAR_TOP keyframes referenced by sample_data.json',
                _regen_fix(root, 'the metadata'))
    todo = _sample(cams, FAST_SAMPLES, full) + _sample(lidar, FAST_SAMPLES, full)
    for rel, rec in _progress(todo, 'sensor files', full):
        path = root / rel
        fix = _regen_fix(root, 'the samples/ blobs')
        if not path.is_file():
            rep.add(path, 'missing file referenced by sample_data.json', fix, kind='missing sensor file')
            continue
        err = _check_lidar(path, full) if rel.endswith('.bin') else _check_image(path, rec, full)
        if err:
            rep.add(path, err, fix, kind=err.split(':')[0])


# ---- Occ3D ----------------------------------------------------------------------------------------
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


def _check_occ(root: Path, t: dict, full: bool, rep: _Report):
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
    for scene, tok in _progress(_sample(pairs, FAST_SAMPLES, full), 'Occ3D labels', full):
        path = gts / scene / tok / 'labels.npz'
        if not path.is_file():
            rep.add(path, 'missing Occ3D labels for a train/val sample',
                    _regen_fix(root, 'the Occ3D gts/ folder'), kind='missing Occ3D labels')
            continue
        err = _check_occ_file(path, full)
        if err:
            rep.add(path, err, _regen_fix(root, 'the Occ3D gts/ folder'), kind=err.split(' (')[0])


# ---- info pickles -----------------------------------------------------------------------------------
def _load_pickle(path: Path, rep: _Report, fix: str):
    try:
        with open(path, 'rb') as f:
            return pickle.load(f)
    except Exception as e:    # unpickling raises many types (missing modules, truncation)
        rep.add(path, f'info file does not load ({type(e).__name__}: {e})', fix)
        return None


def _describe_foreign(obj) -> str:
    """What format an info file that is not the expected one is in."""
    if isinstance(obj, dict) and ('data_list' in obj or 'metainfo' in obj):
        return ("info file is in the mmdet3d v1.x format ('data_list'/'metainfo', written by "
                "mmdetection3d >= 1.1 tools/create_data.py or update_infos_to_v2)")
    if isinstance(obj, dict) and 'infos' in obj:
        return "info file is in the mmdet3d 0.x / BEVDet format (dict with 'infos', 'metadata')"
    if isinstance(obj, list):
        return 'info file is a plain list of dicts (the BEVDepth scripts/gen_info.py format)'
    return f'info file holds a {type(obj).__name__}, not a known info format'


def _check_opened_paths(paths, rep, path, fix):
    """FB-OCC's pipeline opens lidar_path / data_path exactly as stored, from the FB-BEV checkout, wherever the
    data root is: they must be absolute (as the kit's preparation writes them) and exist."""
    for p in map(str, paths):
        if not os.path.isabs(p):
            rep.add(path, f'info holds the relative path {p}, which training opens from the FB-BEV checkout, '
                    f'not from the data root', fix + ' with --force (it writes absolute paths)',
                    kind=f'{path.name}: relative paths')
        elif not os.path.exists(p):
            rep.add(path, f'info refers to {p}, which does not exist (made for another data root?)',
                    fix + ' with --force', kind=f'{path.name}: info refers to missing files')


def _check_info_paths(root: Path, rel_paths, rep, path, fix):
    """Paths inside infos are relative to the model's repo ('./data/nuscenes/samples/...'):
    check the part from 'samples/' or 'gts/' on against the data root."""
    for p in rel_paths:
        p = str(p)
        m = re.search(r'(?:^|/)((?:samples|sweeps|gts)/.*)$', p)
        if m and not (root / m.group(1)).exists():
            rep.add(path, f'info refers to {p}, but {root / m.group(1)} does not exist', fix,
                    kind=f'{path.name}: info refers to missing files')


def _check_fbocc_infos(root: Path, t: dict, full: bool, rep: _Report):
    fix = PREPARE_HINT['fbocc']
    sample_tokens = {s['token'] for s in t['sample']} if t.get('sample') is not None else None
    for name in FBOCC_INFO_FILES:
        path = root / name
        if not path.is_file():
            rep.add(path, 'missing FB-OCC info file', fix)
            continue
        obj = _load_pickle(path, rep, fix)
        if obj is None:
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get('infos'), list) and 'metadata' in obj):
            rep.add(path, _describe_foreign(obj) + "; FB-OCC needs {'infos': [...], 'metadata': "
                    "{'version': 'v1.0-trainval'}} from FB-BEV tools/create_data_bevdet.py", fix)
            continue
        infos = obj['infos']
        if not infos:
            rep.add(path, 'info file holds no samples', fix + ' (are the scene names real split names?)')
            continue
        for info in _sample(infos, FAST_SAMPLES, full):
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
            _check_opened_paths([info['lidar_path']] + [c['data_path'] for c in cams.values()], rep, path, fix)
            _check_info_paths(root, [info['occ_path'] + '/labels.npz'], rep, path, fix)


def _check_bevdepth_infos(root: Path, t: dict, full: bool, rep: _Report):
    fix = PREPARE_HINT['bevdepth']
    sample_tokens = {s['token'] for s in t['sample']} if t.get('sample') is not None else None
    for name in BEVDEPTH_INFO_FILES:
        path = root / name
        if not path.is_file():
            rep.add(path, 'missing BEVDepth info file', fix)
            continue
        obj = _load_pickle(path, rep, fix)
        if obj is None:
            continue
        if not isinstance(obj, list):
            rep.add(path, _describe_foreign(obj) + '; BEVDepth needs the plain list written by its '
                    'scripts/gen_info.py', fix)
            continue
        if not obj:
            rep.add(path, 'info file holds no samples', fix + ' (are the scene names real split names?)')
            continue
        for info in _sample(obj, FAST_SAMPLES, full):
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
            _check_info_paths(root, [c['filename'] for c in cams.values()]
                              + [info['lidar_infos'][LIDAR]['filename']], rep, path, fix)


def _check_depth_gt(root: Path, t: dict, full: bool, rep: _Report):
    """BEVDepth NPU-style precomputed depth: depth_gt/<image basename>.bin, float32 (N,3)."""
    folder = root / 'depth_gt'
    if not folder.is_dir():
        return
    fix = "regenerate depth_gt (see bevdepth/README.md, 'Data')"
    files = sorted(folder.glob('*.bin'))
    if not files:
        rep.add(folder, 'depth_gt/ holds no .bin files', fix)
        return
    for path in _progress(_sample(files, FAST_SAMPLES, full), 'depth_gt', full):
        size = path.stat().st_size
        if size % 12:
            rep.add(path, f'truncated depth_gt file: {size} bytes is not a whole number of '
                    f'(u, v, depth) float32 triples', fix, kind='truncated depth_gt')
            continue
        if full and size:
            d = np.fromfile(path, dtype='<f4').reshape(-1, 3)
            if not np.isfinite(d).all() or (d[:, 2] <= 0).any():
                rep.add(path, 'depth_gt holds non-finite or non-positive depths', fix,
                        kind='bad depth_gt values')
    # every camera keyframe of the train split should have one (the NPU port reads them in training)
    if t.get('sample_data') is not None and t.get('scene') is not None and t.get('sample') is not None:
        from nuscenes.utils import splits
        train = {sc['token'] for sc in t['scene'] if sc['name'] in set(splits.train)}
        train_samples = {s['token'] for s in t['sample'] if s['scene_token'] in train}
        have = {p.name for p in files}
        wanted = [Path(r['filename']).name + '.bin' for r in t['sample_data']
                  if r.get('is_key_frame') and r['filename'].endswith('.jpg')
                  and r['sample_token'] in train_samples]
        for w in _sample(wanted, FAST_SAMPLES, full):
            if w not in have:
                rep.add(folder / w, 'missing depth_gt for a train camera keyframe', fix,
                        kind='missing depth_gt')


# ---- entry points ----------------------------------------------------------------------------------
def validate(model: str, data_root, full: bool = False) -> list:
    """Problems found in ``data_root`` for ``model`` ('fbocc' or 'bevdepth'); [] when all is well."""
    if model not in MODELS:
        raise ValueError(f'model must be one of {MODELS}, not {model!r}')
    root = Path(data_root).expanduser()
    rep = _Report()
    try:
        importlib.import_module('nuscenes.utils.splits')     # the split names select the scenes
    except ImportError as e:
        rep.add('nuscenes-devkit', f'nuscenes-devkit does not import ({e}); both models read the '
                f'data through it', 'run setup.sh (it installs nuscenes-devkit==1.2.0)')
        return rep.finish()
    if not _check_root(root, rep):
        return rep.finish()
    tables = _load_tables(root, TRAINVAL, full, rep)
    _check_integrity(root, TRAINVAL, tables, model, rep)
    if model == 'bevdepth':        # scripts/gen_info.py loads v1.0-test too
        if not (root / TEST).is_dir():
            rep.add(root / TEST, f'no {TEST} folder (BEVDepth scripts/gen_info.py loads it)',
                    f'add the nuScenes {TEST} metadata, or generate a synthetic dataset with '
                    f'--test-scenes >= 0 (it always writes {TEST})')
        else:
            test_tables = _load_tables(root, TEST, full, rep)
            _check_integrity(root, TEST, test_tables, model, rep)
    _check_files(root, _keyframe_files(root, TRAINVAL, tables, rep), full, rep)
    if model == 'fbocc':
        _check_occ(root, tables, full, rep)
        _check_fbocc_infos(root, tables, full, rep)
    else:
        _check_bevdepth_infos(root, tables, full, rep)
        _check_depth_gt(root, tables, full, rep)
    return rep.finish()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='python -m bevkit.data.validate',
                                 description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', required=True, choices=MODELS)
    ap.add_argument('data_root', help='the folder holding v1.0-trainval/, samples/, ...')
    ap.add_argument('--full', action='store_true', help='read every file (slow on real nuScenes)')
    a = ap.parse_args(argv)
    problems = validate(a.model, a.data_root, full=a.full)
    mode = 'full' if a.full else f'fast (up to {FAST_SAMPLES} files per kind; --full checks all)'
    if problems:
        for p in problems:
            print(p)
        print(f'\n{len(problems)} problem(s) in {a.data_root} for {a.model} [{mode}]')
        return 1
    print(f'OK: {a.data_root} is ready for {a.model} [{mode}]')
    return 0


if __name__ == '__main__':
    sys.exit(main())
