"""Check a nuScenes-format data root before training a model of the kit.

    python -m bevkit.data.validate --model {fbocc,bevdepth} DATA_ROOT [--full]

Checks the nuScenes tables and the files they reference (camera JPEGs, LIDAR_TOP .pcd.bin) here, then the
model's own files through its ``ModelSpec.data_checks`` module (FB-OCC: Occ3D labels and info pickles;
BEVDepth: info pickles and depth_gt/). The default mode checks every file cheaply (its end marker, size or zip
directory: :mod:`bevkit.data.filecheck`) and decodes a sample of each kind; --full decodes all of them. Every problem names a file and a one-line fix; the exit status is 1 when there are problems.
The helpers the model modules share (:class:`Report`, :func:`sample` ...) live here; those for info pickles in
:mod:`bevkit.data.infos`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bevkit.data import filecheck
from bevkit.data.schema import LIDAR, TABLE_FIELDS, TABLES, TEST, TRAINVAL
from bevkit.registry import MODELS as _REGISTRY
from bevkit.registry import get_spec

#: Models whose data can be checked (each model's own part: ``ModelSpec.data_checks``).
MODELS = tuple(_REGISTRY)
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


class Report:
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


def regen_fix(root: Path, what: str) -> str:
    if (root / 'SYNTHETIC.json').exists():
        return f'regenerate the synthetic dataset: python -m bevkit.data.synthetic --out {root} --overwrite'
    return f're-extract {what} from the nuScenes download into {root}'


def sample(items, k, full):
    items = list(items)
    if full or len(items) <= k:
        return items
    return random.Random(0).sample(items, k)


def check_all(check, items, desc, full) -> list:
    """``check(item)`` for every item over threads (:func:`bevkit.data.filecheck.each`: exceptions are returned),
    with a progress bar in full mode."""
    bar = None
    if full:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(items), desc=desc, unit='file', file=sys.stderr, leave=False)
        except ImportError:      # tqdm comes with the devkit; the validator still works without it
            pass

    def one(item):
        try:
            return check(item)
        finally:
            if bar is not None:
                bar.update(1)
    try:
        return filecheck.each(one, items)
    finally:
        if bar is not None:
            bar.close()


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


def _check_root(root: Path, rep: Report) -> bool:
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


def _load_tables(root: Path, version: str, full: bool, rep: Report) -> dict:
    """Loaded tables (big ones may be None in fast mode); records checked for required fields."""
    folder = root / version
    tables = {}
    fix_tables = regen_fix(root, f'the {version} metadata')
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


def _check_integrity(root: Path, version: str, t: dict, checks, rep: Report):
    """Cross-table facts the devkit, the converters and the pipelines rely on."""
    folder = root / version
    if t.get('map') is not None and t.get('log') is not None:
        mapped = {lt for m in t['map'] for lt in m.get('log_tokens', [])}
        for log in t['log']:
            if log['token'] not in mapped:
                rep.add(folder / 'map.json', f'log {log["token"]} is in no map record\'s log_tokens '
                        f'(the devkit fails to load)', regen_fix(root, 'map.json'),
                        kind='log without map')
        for m in t['map']:
            if not (root / m.get('filename', '')).is_file():
                rep.add(root / m.get('filename', 'maps/?'), 'map image missing',
                        regen_fix(root, 'the maps/ folder'), kind='map image missing')
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
                    regen_fix(root, 'the metadata'), kind='scene first sample missing')
            continue
        least = checks.MIN_SAMPLES_PER_SCENE
        if version == TRAINVAL and len(recs) < least:
            rep.add(folder / 'scene.json', f'scene {sc["name"]} has {len(recs)} sample(s); {checks.SCENE_NEED}',
                    f'give every scene >= {least} samples (--samples-per-scene)', kind='short scene')
        if recs:
            spans.append((recs[0]['timestamp'], recs[-1]['timestamp'], sc['name']))
    spans.sort()
    for (a0, a1, na), (b0, b1, nb) in zip(spans, spans[1:]):
        if b0 <= a1:
            rep.add(folder / 'sample.json', f'scenes {na} and {nb} overlap in time; FB-OCC sorts all '
                    f'samples by timestamp and would mix their sequences',
                    'give each scene a disjoint time range', kind='scenes overlap')


def _keyframe_files(root: Path, version: str, t: dict, rep: Report) -> list:
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


def _decode_image(path: Path, rec, full) -> str:
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


def _decode_lidar(path: Path) -> str:
    pts = np.fromfile(path, dtype='<f4').reshape(-1, 5)
    if not np.isfinite(pts).all():
        return 'lidar file holds NaN/inf values'
    return ''


def missing_fix(root: Path, rel: str, source: str = 'your nuScenes download') -> str:
    """A file the dataset itself lists is gone: no data preparation can make it again."""
    if (root / 'SYNTHETIC.json').exists():
        return regen_fix(root, rel)
    return (f'{rel} is missing from the dataset: restore it from {source} (re-download or re-extract the '
            f'archive that holds it into {root}); the data preparation cannot recreate it')


def _check_files(root: Path, files: list, full: bool, rep: Report):
    """Every keyframe file: present, a JPEG with both markers / whole lidar points (cheap, all files); decoded
    for a sample of each kind (all with --full)."""
    cams = [f for f in files if f[0].endswith(('.jpg', '.jpeg'))]
    lidar = [f for f in files if f[0].endswith('.bin')]
    if not cams:
        rep.add(root / 'samples', 'no camera keyframes referenced by sample_data.json',
                regen_fix(root, 'the metadata'))
    if not lidar:
        rep.add(root / 'samples' / LIDAR, 'no LIDAR_TOP keyframes referenced by sample_data.json',
                regen_fix(root, 'the metadata'))
    decode = {rel for rel, _ in sample(cams, FAST_SAMPLES, full) + sample(lidar, FAST_SAMPLES, full)}

    def check(item):
        rel, rec = item
        path = root / rel
        if rel.endswith('.bin'):
            return filecheck.lidar(path) or (_decode_lidar(path) if rel in decode else '')
        return filecheck.jpeg(path) or (_decode_image(path, rec, full) if rel in decode else '')

    for (rel, _), err in zip(cams + lidar, check_all(check, cams + lidar, 'sensor files', full)):
        path = root / rel
        if isinstance(err, FileNotFoundError):
            rep.add(path, 'missing file referenced by sample_data.json', missing_fix(root, rel),
                    kind='missing sensor file')
            continue
        if isinstance(err, Exception):
            err = f'unreadable file ({type(err).__name__}: {err})'
        if err:
            rep.add(path, err, regen_fix(root, rel), kind=err.split(':')[0])


# ---- entry points ----------------------------------------------------------------------------------
def validate(model: str, data_root, full: bool = False) -> list:
    """Problems found in ``data_root`` for ``model`` (a registered model); [] when all is well."""
    if model not in MODELS:
        raise ValueError(f'model must be one of {MODELS}, not {model!r}')
    checks = get_spec(model).data_module()
    root = Path(data_root).expanduser()
    rep = Report()
    try:
        importlib.import_module('nuscenes.utils.splits')     # the split names select the scenes
    except ImportError as e:
        rep.add('nuscenes-devkit', f'nuscenes-devkit does not import ({e}); both models read the '
                f'data through it', 'run setup.sh (it installs nuscenes-devkit==1.2.0)')
        return rep.finish()
    if not _check_root(root, rep):
        return rep.finish()
    tables = _load_tables(root, TRAINVAL, full, rep)
    _check_integrity(root, TRAINVAL, tables, checks, rep)
    if checks.NEEDS_TEST_TABLES:
        if not (root / TEST).is_dir():
            rep.add(root / TEST, f'no {TEST} folder ({checks.TEST_TABLES_WHY})',
                    f'add the nuScenes {TEST} metadata, or generate a synthetic dataset with '
                    f'--test-scenes >= 0 (it always writes {TEST})')
        else:
            test_tables = _load_tables(root, TEST, full, rep)
            _check_integrity(root, TEST, test_tables, checks, rep)
    _check_files(root, _keyframe_files(root, TRAINVAL, tables, rep), full, rep)
    checks.check(root, tables, full, rep)
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
