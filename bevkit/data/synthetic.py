"""Generate a small synthetic dataset in the exact on-disk nuScenes + Occ3D format.

    python -m bevkit.data.synthetic --out data/nuscenes [--seed 0] [--train-scenes 6]
        [--val-scenes 2] [--test-scenes 1] [--samples-per-scene 10] [--image-size 1600x900]
        [--scenery mixed|banded]

Writes DIR/v1.0-trainval/*.json (13 tables), DIR/v1.0-test/*.json (for BEVDepth's info script),
DIR/samples/CAM_*/*.jpg, DIR/samples/LIDAR_TOP/*.pcd.bin, DIR/maps/*.png and
DIR/gts/<scene>/<sample_token>/labels.npz (Occ3D), all observing one procedural world per scene
(see bevkit/data/world.py). Same seed and options give the same bytes.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import world as W
from .schema import (ATTRIBUTES, CAMERAS, CATEGORIES, DET_CATEGORY, LIDAR, TEST,
                     TRAINVAL, VISIBILITIES)

MARKER = 'SYNTHETIC.json'
SAMPLE_DT = 0.5                       # nuScenes keyframes: 2 Hz
ANNOTATION_RADIUS = 60.0              # annotate objects within this xy distance of the ego [m]
BASE_TIME_US = 1531883530000000       # 2018-07-18 03:12:10 UTC
SCENE_GAP_US = 120 * 1000000
LOCATION = 'boston-seaport'
DEFAULTS = dict(seed=0, train_scenes=6, val_scenes=2, test_scenes=1, samples_per_scene=10,
                image_size=(W.FULL_W, W.FULL_H), scenery='mixed')


def token(seed: int, *key) -> str:
    """Deterministic 32-hex token."""
    return hashlib.md5('/'.join(str(k) for k in (seed,) + key).encode()).hexdigest()


def yaw_quat(yaw: float) -> list:
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


@dataclass
class SceneSpec:
    name: str
    split: str            # train / val / test
    seed: int             # world seed
    start_us: int
    n_samples: int
    image_size: tuple
    scenery: str = 'mixed'  # world.SCENERIES

    @property
    def logfile(self) -> str:
        t = datetime.datetime.fromtimestamp(self.start_us / 1e6, datetime.timezone.utc)
        return 'n015-' + (t + datetime.timedelta(hours=8)).strftime('%Y-%m-%d-%H-%M-%S') + '+0800'

    def timestamp(self, k: int) -> int:
        return self.start_us + int(round(k * SAMPLE_DT * 1e6))


def plan_scenes(seed, train_scenes, val_scenes, test_scenes, samples_per_scene, image_size, scenery='mixed'):
    """Scene names from the devkit's real splits; disjoint, increasing time ranges by scene number."""
    from nuscenes.utils import splits
    for split, n, names in (('train', train_scenes, splits.train), ('val', val_scenes, splits.val),
                            ('test', test_scenes, splits.test)):
        if n > len(names):
            raise ValueError(f'--{split}-scenes {n}: nuScenes has only {len(names)} {split} scenes')
    if scenery not in W.SCENERIES:
        raise ValueError(f"--scenery {scenery}: expected one of {', '.join(W.SCENERIES)}")
    if samples_per_scene < 2:
        raise ValueError('--samples-per-scene must be >= 2 (FB-OCC splits each train scene in two)')
    chosen = ([(n, 'train') for n in splits.train[:train_scenes]]
              + [(n, 'val') for n in splits.val[:val_scenes]]
              + [(n, 'test') for n in splits.test[:test_scenes]])
    chosen.sort(key=lambda x: x[0])
    duration = int(round((samples_per_scene - 1) * SAMPLE_DT * 1e6))
    specs = []
    for i, (name, split) in enumerate(chosen):
        wseed = int(token(seed, 'world', name)[:8], 16)
        specs.append(SceneSpec(name, split, wseed, BASE_TIME_US + i * (duration + SCENE_GAP_US),
                               samples_per_scene, tuple(image_size), scenery))
    return specs


def _scene_sensors(spec: SceneSpec) -> dict:
    return W.make_sensors(np.random.default_rng(spec.seed + 1), spec.image_size)


def _relpath(spec: SceneSpec, channel: str, k: int) -> str:
    ext = 'pcd.bin' if channel == LIDAR else 'jpg'
    return f'samples/{channel}/{spec.logfile}__{channel}__{spec.timestamp(k)}.{ext}'


# ---- per-sample work (runs in worker processes) -------------------------------------------------
_WORLDS: dict = {}


def _tune_malloc():
    """Keep freed image-sized buffers in the heap (glibc): the renderer allocates many
    full-frame temporaries, and returning each to the OS costs ~20% in page faults.
    Only for processes we own (workers, the CLI)."""
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 512 * 2**20)     # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1024 * 2**20)    # M_TRIM_THRESHOLD
    except (OSError, AttributeError):     # not glibc: nothing to tune
        pass


def _world(spec: SceneSpec):
    key = repr(spec)        # name, seed, sample count, image size and scenery
    if key not in _WORLDS:
        _WORLDS.clear()      # one scene at a time per worker keeps memory flat
        _WORLDS[key] = (W.build_world(spec.seed, spec.n_samples, SAMPLE_DT, spec.scenery), _scene_sensors(spec))
    return _WORLDS[key]


def _render_sample(args):
    """Render one keyframe: 6 JPEGs, the lidar sweep, Occ3D labels. Returns per-object stats."""
    out, spec, k, sample_token = args
    from PIL import Image
    world, sensors = _world(spec)
    t = k * SAMPLE_DT
    centers = world.centers(t)
    corners = W.all_box_corners(world, centers)
    views = {}
    visible = np.zeros(len(world.cls), np.int64)
    full = np.zeros(len(world.cls), np.int64)
    for cam in CAMERAS:
        view = W.render_camera(world, t, sensors[cam], centers, corners)
        Image.fromarray(view.rgb).save(os.path.join(out, _relpath(spec, cam, k)), 'JPEG',
                                       quality=92)
        visible += view.visible_px
        full += view.full_px
        views[cam] = view
    scan = W.cast_lidar(world, t, sensors[LIDAR], centers)
    scan.points.astype('<f4').tofile(os.path.join(out, _relpath(spec, LIDAR, k)))
    n_pts = np.bincount(scan.obj[scan.obj >= 0], minlength=len(world.cls))
    if spec.split != 'test':       # Occ3D has no public test labels
        sem = W.voxelize(world, t, centers)
        mask_camera = W.camera_mask(world, t, sensors, views)
        mask_lidar = W.lidar_mask(sensors[LIDAR], scan)
        d = os.path.join(out, 'gts', spec.name, sample_token)
        os.makedirs(d, exist_ok=True)
        np.savez_compressed(os.path.join(d, 'labels.npz'), semantics=sem,
                            mask_lidar=mask_lidar, mask_camera=mask_camera)
    return spec.name, k, n_pts, visible, full


# ---- tables ----------------------------------------------------------------------------------------
def _static_tables(seed):
    sensors = [{'token': token(seed, 'sensor', ch), 'channel': ch,
                'modality': 'lidar' if ch == LIDAR else 'camera'} for ch in CAMERAS + (LIDAR,)]
    return {
        'category': [{'token': token(seed, 'category', n), 'name': n, 'description': d}
                     for n, d in CATEGORIES],
        'attribute': [{'token': token(seed, 'attribute', n), 'name': n, 'description': d}
                      for n, d in ATTRIBUTES],
        'visibility': [{'token': tok, 'level': lvl,
                        'description': f'visibility of whole object is between {lvl[1:].replace("-", " and ")}%'}
                       for tok, lvl in VISIBILITIES],
        'sensor': sensors,
    }


def _visibility_token(frac: float) -> str:
    for (tok, _), hi in zip(VISIBILITIES, (0.4, 0.6, 0.8, 1.01)):
        if frac < hi:
            return tok
    return VISIBILITIES[-1][0]


def _build_tables(seed, specs, results, map_token, map_file):
    """All 13 tables for the given scenes (one version folder)."""
    tables = _static_tables(seed)
    for name in ('instance', 'calibrated_sensor', 'ego_pose', 'log', 'scene', 'sample',
                 'sample_data', 'sample_annotation'):
        tables[name] = []
    sensor_tok = {s['channel']: s['token'] for s in tables['sensor']}
    cat_tok = {c['name']: c['token'] for c in tables['category']}
    attr_tok = {a['name']: a['token'] for a in tables['attribute']}
    for spec in specs:
        world, sensors = W.build_world(spec.seed, spec.n_samples, SAMPLE_DT, spec.scenery), _scene_sensors(spec)
        log_tok = token(seed, 'log', spec.name)
        tables['log'].append({'token': log_tok, 'logfile': spec.logfile, 'vehicle': 'n015',
                              'date_captured': spec.logfile[5:15], 'location': LOCATION})
        cs_tok = {}
        for ch in CAMERAS + (LIDAR,):
            s = sensors[ch]
            cs_tok[ch] = token(seed, 'calibrated_sensor', spec.name, ch)
            tables['calibrated_sensor'].append({
                'token': cs_tok[ch], 'sensor_token': sensor_tok[ch],
                'translation': [float(v) for v in s.translation], 'rotation': W.mat_to_quat(s.rotation),
                'camera_intrinsic': [] if s.intrinsic is None else s.intrinsic.tolist()})
        sample_toks = [token(seed, 'sample', spec.name, k) for k in range(spec.n_samples)]
        scene_tok = token(seed, 'scene', spec.name)
        tables['scene'].append({'token': scene_tok, 'log_token': log_tok,
                                'nbr_samples': spec.n_samples, 'first_sample_token': sample_toks[0],
                                'last_sample_token': sample_toks[-1], 'name': spec.name,
                                'description': f'synthetic street, {spec.split} split, seed {spec.seed}'})
        det_ids = W.det_object_ids(world)
        inst_anns = {int(i): [] for i in det_ids}
        for k, stok in enumerate(sample_toks):
            ts = spec.timestamp(k)
            tables['sample'].append({'token': stok, 'timestamp': ts, 'scene_token': scene_tok,
                                     'prev': sample_toks[k - 1] if k > 0 else '',
                                     'next': sample_toks[k + 1] if k + 1 < spec.n_samples else ''})
            ex, ey, eyaw = world.ego_pose(k * SAMPLE_DT)
            e_trans = [float(v) for v in world.to_global([ex, ey, 0.0])]
            e_rot = yaw_quat(eyaw + world.heading)
            for ch in CAMERAS + (LIDAR,):
                sd_tok = token(seed, 'sample_data', spec.name, ch, k)
                cam = ch != LIDAR
                tables['ego_pose'].append({'token': sd_tok, 'timestamp': ts,
                                           'rotation': e_rot, 'translation': e_trans})
                tables['sample_data'].append({
                    'token': sd_tok, 'sample_token': stok, 'ego_pose_token': sd_tok,
                    'calibrated_sensor_token': cs_tok[ch], 'timestamp': ts,
                    'fileformat': 'jpg' if cam else 'pcd', 'is_key_frame': True,
                    'height': spec.image_size[1] if cam else 0,
                    'width': spec.image_size[0] if cam else 0,
                    'filename': _relpath(spec, ch, k),
                    'prev': token(seed, 'sample_data', spec.name, ch, k - 1) if k > 0 else '',
                    'next': (token(seed, 'sample_data', spec.name, ch, k + 1)
                             if k + 1 < spec.n_samples else '')})
            if spec.split == 'test':
                continue            # v1.0-test has no annotations
            n_pts, visible, full = results[(spec.name, k)]
            centers = world.centers(k * SAMPLE_DT)
            dist = np.hypot(centers[det_ids, 0] - ex, centers[det_ids, 1] - ey)
            for i in det_ids[dist <= ANNOTATION_RADIUS]:
                i = int(i)
                size = world.size[i]
                frac = visible[i] / full[i] if full[i] > 0 else 0.0
                inst_anns[i].append({
                    'token': token(seed, 'sample_annotation', spec.name, i, k),
                    'sample_token': stok, 'instance_token': token(seed, 'instance', spec.name, i),
                    'visibility_token': _visibility_token(frac),
                    'attribute_tokens': [attr_tok[world.attr[i]]] if world.attr[i] else [],
                    'translation': [float(v) for v in world.to_global(centers[i])],
                    'size': [float(size[1]), float(size[0]), float(size[2])],     # w, l, h
                    'rotation': yaw_quat(world.yaw[i] + world.heading),
                    'prev': '', 'next': '',
                    'num_lidar_pts': int(n_pts[i]), 'num_radar_pts': 0})
        for i, anns in inst_anns.items():
            if not anns:
                continue
            for a, b in zip(anns, anns[1:]):
                a['next'], b['prev'] = b['token'], a['token']
            tables['sample_annotation'] += anns
            tables['instance'].append({
                'token': anns[0]['instance_token'],
                'category_token': cat_tok[DET_CATEGORY[world.det[i]]],
                'nbr_annotations': len(anns), 'first_annotation_token': anns[0]['token'],
                'last_annotation_token': anns[-1]['token']})
    tables['map'] = [{'token': map_token, 'log_tokens': [lg['token'] for lg in tables['log']],
                      'category': 'semantic_prior', 'filename': map_file}]
    return tables


def _write_tables(folder: Path, tables: dict):
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in tables.items():
        with open(folder / f'{name}.json', 'w') as f:
            json.dump(records, f, indent=0)


def _write_map(out: Path, path: str, seed: int):
    from PIL import Image
    rng = np.random.default_rng(seed)
    img = (rng.uniform(0, 1, (64, 64)) > 0.5).astype(np.uint8) * 255
    img = np.kron(img, np.ones((4, 4), np.uint8))
    (out / path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out / path)


def _prepare_out(out: Path, overwrite: bool):
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FileExistsError(f'{out} is not empty and holds no {MARKER}: pick an empty or new '
                                  f'folder (nothing is deleted)')
        if not overwrite:
            raise FileExistsError(f'{out} already holds a synthetic dataset: pass --overwrite to '
                                  f'regenerate it, or pick another --out')
        # only the folders this generator writes; prepared info pickles / depth_gt stay
        for sub in ('v1.0-trainval', 'v1.0-test', 'samples', 'maps', 'gts'):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)


def _dir_size(path: Path) -> tuple:
    n = size = 0
    for root, _, files in os.walk(path):
        for f in files:
            n += 1
            size += os.path.getsize(os.path.join(root, f))
    return n, size


def generate(out, seed: int = 0, train_scenes: int = 6, val_scenes: int = 2, test_scenes: int = 1,
             samples_per_scene: int = 10, image_size=(W.FULL_W, W.FULL_H), workers: int = None,
             overwrite: bool = False, progress: bool = True, scenery: str = 'mixed') -> dict:
    """Write the dataset to ``out``; returns a summary (counts, seconds, bytes)."""
    t_start = time.time()
    out = Path(out)
    image_size = tuple(int(v) for v in image_size)
    specs = plan_scenes(seed, train_scenes, val_scenes, test_scenes, samples_per_scene, image_size, scenery)
    _prepare_out(out, overwrite)
    for ch in CAMERAS + (LIDAR,):
        (out / 'samples' / ch).mkdir(parents=True, exist_ok=True)
    map_token = token(seed, 'map', 0)
    map_file = f'maps/{map_token}.png'
    _write_map(out, map_file, seed)

    tasks = [(str(out), spec, k, token(seed, 'sample', spec.name, k))
             for spec in specs for k in range(spec.n_samples)]
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                      else (os.cpu_count() or 1), 8)
    results = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc='synthetic nuScenes', unit='sample', file=sys.stderr)
    if workers > 1 and len(tasks) > 1:
        import multiprocessing as mp
        ctx = mp.get_context('fork' if 'fork' in mp.get_all_start_methods() else 'spawn')
        with ctx.Pool(min(workers, len(tasks)), initializer=_tune_malloc) as pool:
            for name, k, *stats in pool.imap_unordered(_render_sample, tasks):
                results[(name, k)] = stats
                if bar:
                    bar.update()
    else:
        for task in tasks:
            name, k, *stats = _render_sample(task)
            results[(name, k)] = stats
            if bar:
                bar.update()
    if bar:
        bar.close()

    trainval = [s for s in specs if s.split != 'test']
    test = [s for s in specs if s.split == 'test']
    _write_tables(out / TRAINVAL, _build_tables(seed, trainval, results, map_token, map_file))
    _write_tables(out / TEST, _build_tables(seed, test, results, map_token, map_file))
    n_files, n_bytes = _dir_size(out)
    summary = {
        'generator': 'bevkit.data.synthetic', 'seed': seed, 'train_scenes': train_scenes,
        'val_scenes': val_scenes, 'test_scenes': test_scenes,
        'samples_per_scene': samples_per_scene, 'image_size': list(image_size), 'scenery': scenery,
        'scenes': {s.name: s.split for s in specs}, 'samples': len(tasks),
        'files': n_files, 'bytes': n_bytes, 'seconds': round(time.time() - t_start, 1),
        'workers': workers,
    }
    with open(out / MARKER, 'w') as f:
        json.dump(summary, f, indent=1)
    return summary


def _image_size(text: str) -> tuple:
    try:
        w, h = (int(v) for v in text.lower().split('x'))
        assert w > 0 and h > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f'--image-size {text!r}: expected WIDTHxHEIGHT, e.g. 1600x900')
    return w, h


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='python -m bevkit.data.synthetic', description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', required=True, help='dataset root to create (e.g. data/nuscenes)')
    ap.add_argument('--seed', type=int, default=DEFAULTS['seed'])
    ap.add_argument('--train-scenes', type=int, default=DEFAULTS['train_scenes'])
    ap.add_argument('--val-scenes', type=int, default=DEFAULTS['val_scenes'])
    ap.add_argument('--test-scenes', type=int, default=DEFAULTS['test_scenes'])
    ap.add_argument('--samples-per-scene', type=int, default=DEFAULTS['samples_per_scene'])
    ap.add_argument('--image-size', type=_image_size, default=DEFAULTS['image_size'],
                    help='WxH (default 1600x900; the model pipelines assume 1600x900, smaller '
                         'sizes are for quick tests)')
    ap.add_argument('--scenery', choices=W.SCENERIES, default=DEFAULTS['scenery'],
                    help="static classes: 'mixed' (scattered trees, plazas, gapped buildings) or 'banded' "
                         "(continuous verge, cabinet, hedge and building rows; the FB-OCC demo's)")
    ap.add_argument('--workers', type=int, default=None, help='processes (default: CPU count, max 8)')
    ap.add_argument('--overwrite', action='store_true',
                    help='regenerate an existing synthetic dataset in --out')
    ap.add_argument('--quiet', action='store_true', help='no progress bar')
    a = ap.parse_args(argv)
    _tune_malloc()
    try:
        s = generate(a.out, seed=a.seed, train_scenes=a.train_scenes, val_scenes=a.val_scenes,
                     test_scenes=a.test_scenes, samples_per_scene=a.samples_per_scene,
                     image_size=a.image_size, scenery=a.scenery, workers=a.workers, overwrite=a.overwrite,
                     progress=not a.quiet)
    except (ValueError, FileExistsError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f"wrote {s['samples']} samples ({s['train_scenes']} train / {s['val_scenes']} val / "
          f"{s['test_scenes']} test scenes) to {a.out}: {s['files']} files, "
          f"{s['bytes'] / 2**20:.1f} MiB, {s['seconds']} s")
    print(f'next: python -m bevkit.data.validate --model fbocc {a.out}   (after data preparation)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
