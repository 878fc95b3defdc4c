"""Test helpers: one small synthetic dataset per test session, and info pickles in the formats
the models' data preparation writes (for validator tests without the upstream tools).

Test modules share the dataset through ``small_dataset(tmp_path_factory)`` (cached here, so
several modules' session fixtures generate it once). Never modify it in a test: copy it with
``hardlink_copy`` and replace (not edit) the files you break.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np

#: Small but complete: 2 train scenes (FB-OCC: 4 sequence groups), 1 val, 1 test; 3 samples each.
SMALL = dict(seed=0, train_scenes=2, val_scenes=1, test_scenes=1, samples_per_scene=3,
             image_size=(400, 225), workers=2, progress=False)
_CACHE: dict = {}


def dataset(tmp_path_factory, **options) -> Path:
    """A synthetic dataset generated once per session for these options (SMALL overridden by
    ``options``), e.g. ``dataset(f, image_size=(1600, 900))`` for pipelines that need full-size
    images."""
    opts = dict(SMALL, **options)
    key = tuple(sorted(opts.items()))
    if key not in _CACHE:
        from .synthetic import generate
        root = tmp_path_factory.mktemp('synthetic') / 'nuscenes'
        generate(root, **opts)
        _CACHE[key] = root
    return _CACHE[key]


def small_dataset(tmp_path_factory) -> Path:
    """The SMALL dataset (images 400x225: format and geometry tests, not model pipelines)."""
    return dataset(tmp_path_factory)


def hardlink_copy(src: Path, dst: Path) -> Path:
    """Cheap copy of a dataset; break files by replacing them (os.replace / unlink), never in place."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def replace_bytes(path: Path, data: bytes):
    """Give a hard-linked file new content without touching the other links."""
    path.unlink()
    path.write_bytes(data)


def _quat_mat(q):
    from pyquaternion import Quaternion
    return Quaternion(q).rotation_matrix


def write_fbocc_infos(root: Path, nusc) -> list:
    """bevdetv2-nuscenes_infos_{train,val}.pkl with the keys FB-BEV's create_data_bevdet.py writes and the paths
    relative to the data root that bevkit.models.fbocc.prepare gives them (values simplified: no boxes; enough for
    format checks)."""
    from nuscenes.utils import splits
    from .schema import CAMERAS, FBOCC_INFO_FILES
    out = []
    for split, fname in zip(('train', 'val'), FBOCC_INFO_FILES):
        names = set(getattr(splits, split))
        infos = []
        for s in nusc.sample:
            scene = nusc.get('scene', s['scene_token'])
            if scene['name'] not in names:
                continue
            lsd = nusc.get('sample_data', s['data']['LIDAR_TOP'])
            lcs = nusc.get('calibrated_sensor', lsd['calibrated_sensor_token'])
            lep = nusc.get('ego_pose', lsd['ego_pose_token'])
            cams = {}
            for cam in CAMERAS:
                sd = nusc.get('sample_data', s['data'][cam])
                cs = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
                ep = nusc.get('ego_pose', sd['ego_pose_token'])
                cams[cam] = {
                    'data_path': sd['filename'], 'type': cam,
                    'sample_data_token': sd['token'], 'sensor2ego_translation': cs['translation'],
                    'sensor2ego_rotation': cs['rotation'], 'ego2global_translation': ep['translation'],
                    'ego2global_rotation': ep['rotation'], 'timestamp': sd['timestamp'],
                    'sensor2lidar_rotation': np.eye(3), 'sensor2lidar_translation': np.zeros(3),
                    'cam_intrinsic': np.array(cs['camera_intrinsic'])}
            infos.append({
                'lidar_path': lsd['filename'], 'token': s['token'], 'sweeps': [],
                'cams': cams, 'lidar2ego_translation': lcs['translation'],
                'lidar2ego_rotation': lcs['rotation'], 'ego2global_translation': lep['translation'],
                'ego2global_rotation': lep['rotation'], 'timestamp': s['timestamp'],
                'gt_boxes': np.zeros((0, 7)), 'gt_names': np.array([]), 'gt_velocity': np.zeros((0, 2)),
                'num_lidar_pts': np.array([]), 'num_radar_pts': np.array([]),
                'valid_flag': np.array([], bool), 'ann_infos': ([], []),
                'scene_token': s['scene_token'], 'scene_name': scene['name'], 'prev': s['prev'],
                'occ_path': f'./data/nuscenes/gts/{scene["name"]}/{s["token"]}'})
        with open(root / fname, 'wb') as f:
            pickle.dump({'infos': infos, 'metadata': {'version': 'v1.0-trainval'}}, f)
        out.append(root / fname)
    return out


def write_bevdepth_infos(root: Path, nusc) -> list:
    """nuscenes_infos_{train,val}.pkl as BEVDepth's scripts/gen_info.py writes them (plain lists)."""
    from nuscenes.utils import splits
    from .schema import BEVDEPTH_INFO_FILES, CAMERAS
    out = []
    for split, fname in zip(('train', 'val'), BEVDEPTH_INFO_FILES):
        names = set(getattr(splits, split))
        infos = []
        for s in nusc.sample:
            if nusc.get('scene', s['scene_token'])['name'] not in names:
                continue

            def sensor_info(channel, camera):
                sd = nusc.get('sample_data', s['data'][channel])
                d = {'sample_token': sd['sample_token'], 'ego_pose': nusc.get('ego_pose', sd['ego_pose_token']),
                     'timestamp': sd['timestamp'], 'filename': sd['filename'],
                     'calibrated_sensor': nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])}
                if camera:
                    d.update(is_key_frame=sd['is_key_frame'], height=sd['height'], width=sd['width'])
                return d
            anns = []
            for a in s['anns']:
                rec = dict(nusc.get('sample_annotation', a))
                v = nusc.box_velocity(a)
                rec['velocity'] = np.zeros(3) if np.isnan(v).any() else v
                anns.append(rec)
            infos.append({'sample_token': s['token'], 'timestamp': s['timestamp'],
                          'scene_token': s['scene_token'],
                          'cam_infos': {c: sensor_info(c, True) for c in CAMERAS},
                          'lidar_infos': {'LIDAR_TOP': sensor_info('LIDAR_TOP', False)},
                          'cam_sweeps': [], 'lidar_sweeps': [], 'ann_infos': anns})
        with open(root / fname, 'wb') as f:
            pickle.dump(infos, f)
        out.append(root / fname)
    return out
