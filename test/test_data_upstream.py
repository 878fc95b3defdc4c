"""The unchanged BEVDepth info script runs on the synthetic dataset, and its output validates.

(FB-BEV's tools/create_data_bevdet.py needs the full patched mmdet3d import; it is exercised by the
FB-OCC tests.) Skips with the reason when no BEVDepth source or no mmcv is available.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

pytest.importorskip('nuscenes')

from bevkit.data import validate as V  # noqa: E402
from bevkit.data.testing import SMALL  # noqa: E402

pytestmark = pytest.mark.upstream


def test_bevdepth_gen_info_runs_on_synthetic_data(request, root, tmp_path):
    try:
        checkout = request.getfixturevalue('bevdepth_checkout')
    except pytest.FixtureLookupError:
        pytest.skip('needs the bevdepth_checkout fixture (test/conftest.py)')
    try:
        import mmcv  # noqa: F401 (gen_info.py writes its pickles with mmcv.dump)
    except ImportError:
        pytest.skip('needs mmcv (installed by setup.sh)')
    script = checkout / 'scripts' / 'gen_info.py'
    assert script.is_file(), f'{script} missing from the BEVDepth checkout'
    # gen_info.py reads and writes ./data/nuScenes relative to the CWD: give it a private
    # folder of links so the shared dataset stays untouched
    data = tmp_path / 'data' / 'nuScenes'
    data.mkdir(parents=True)
    for name in ('v1.0-trainval', 'v1.0-test', 'samples', 'maps', 'gts'):
        os.symlink(root / name, data / name)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(data / 'nuscenes_infos_train.pkl', 'rb') as f:
        train = pickle.load(f)
    with open(data / 'nuscenes_infos_test.pkl', 'rb') as f:
        test = pickle.load(f)
    n = SMALL['samples_per_scene']
    assert len(train) == SMALL['train_scenes'] * n and len(test) == SMALL['test_scenes'] * n
    assert any(a['num_lidar_pts'] > 0 for info in train for a in info['ann_infos'])
    assert V.validate('bevdepth', data, full=True) == []
