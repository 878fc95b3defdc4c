"""The data validator finds each kind of broken data root, names the file and a fix."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

pytest.importorskip('nuscenes')

from bevkit.data import validate as V  # noqa: E402
from bevkit.data.schema import OCC_SHAPE  # noqa: E402
from bevkit.data.testing import (hardlink_copy, replace_bytes,  # noqa: E402
                                 write_bevdepth_infos, write_fbocc_infos)


@pytest.fixture
def prepared(root, nusc, tmp_path):
    """A private copy of the dataset with info pickles for both models."""
    data = hardlink_copy(root, tmp_path / 'nuscenes')
    write_fbocc_infos(data, nusc)
    write_bevdepth_infos(data, nusc)
    return data


def _paths(problems):
    return [p.path for p in problems]


def _first_file(data, sub, pattern):
    return sorted((data / sub).glob(pattern))[0]


@pytest.mark.parametrize('model', V.MODELS)
def test_prepared_dataset_is_clean_in_fast_and_full_mode(prepared, model):
    assert V.validate(model, prepared) == []
    assert V.validate(model, prepared, full=True) == []


def test_missing_info_pickles_name_the_data_preparation(root):
    problems = V.validate('fbocc', root)
    assert {str(root / 'bevdetv2-nuscenes_infos_train.pkl'),
            str(root / 'bevdetv2-nuscenes_infos_val.pkl')} <= set(_paths(problems))
    assert all('fbocc/README.md' in p.fix for p in problems)
    problems = V.validate('bevdepth', root)
    assert str(root / 'nuscenes_infos_train.pkl') in _paths(problems)
    assert all('bevdepth/README.md' in p.fix for p in problems)


def test_missing_image(prepared):
    img = _first_file(prepared, 'samples/CAM_FRONT', '*.jpg')
    img.unlink()
    problems = V.validate('bevdepth', prepared, full=True)
    assert [p for p in problems if p.path == str(img) and 'missing' in p.message]
    assert 'regenerate' in problems[0].fix


def test_truncated_lidar_file(prepared):
    pcd = _first_file(prepared, 'samples/LIDAR_TOP', '*.pcd.bin')
    replace_bytes(pcd, pcd.read_bytes()[:-7])
    problems = V.validate('fbocc', prepared, full=True)
    assert [p for p in problems if p.path == str(pcd) and 'truncated' in p.message]
    replace_bytes(pcd, b'')
    assert str(pcd) in _paths(V.validate('fbocc', prepared, full=True))


def test_corrupt_image(prepared):
    img = _first_file(prepared, 'samples/CAM_BACK', '*.jpg')
    whole = img.read_bytes()
    replace_bytes(img, whole[:200])  # cut: found by the default check, which reads every file's last bytes
    for full in (False, True):
        problems = V.validate('fbocc', prepared, full=full)
        assert [p for p in problems if p.path == str(img) and 'truncated image' in p.message]
    replace_bytes(img, whole[:200] + bytes(len(whole) - 202) + whole[-2:])  # both markers, damaged inside
    problems = V.validate('fbocc', prepared, full=True)
    assert [p for p in problems if p.path == str(img) and 'unreadable' in p.message]


def test_occ_labels_without_mask_camera(prepared):
    npz = sorted((prepared / 'gts').rglob('labels.npz'))[0]
    with np.load(npz) as z:
        kept = {k: z[k] for k in ('semantics', 'mask_lidar')}
    buf = io.BytesIO()
    np.savez_compressed(buf, **kept)
    replace_bytes(npz, buf.getvalue())
    problems = V.validate('fbocc', prepared, full=True)
    hit = [p for p in problems if p.path == str(npz)]
    assert hit and 'mask_camera' in hit[0].message


def test_occ_labels_with_wrong_shape(prepared):
    npz = sorted((prepared / 'gts').rglob('labels.npz'))[-1]
    buf = io.BytesIO()
    np.savez_compressed(buf, semantics=np.zeros((200, 200, 8), np.uint8),
                        mask_lidar=np.zeros(OCC_SHAPE, np.uint8), mask_camera=np.zeros(OCC_SHAPE, np.uint8))
    replace_bytes(npz, buf.getvalue())
    for full in (False, True):  # the default check reads the zip directory of every file: sizes tell
        hit = [p for p in V.validate('fbocc', prepared, full=full) if p.path == str(npz)]
        assert hit and str(OCC_SHAPE) in hit[0].message


def test_info_pickle_in_new_mmdet3d_format(prepared):
    path = prepared / 'bevdetv2-nuscenes_infos_train.pkl'
    replace_bytes(path, pickle.dumps({'metainfo': {'dataset': 'nuscenes', 'version': 'v1.0-trainval'},
                                      'data_list': [{'sample_idx': 0, 'token': 'x', 'images': {}}]}))
    hit = [p for p in V.validate('fbocc', prepared) if p.path == str(path)]
    assert hit and 'v1.x' in hit[0].message and 'data_list' in hit[0].message
    path = prepared / 'nuscenes_infos_val.pkl'
    replace_bytes(path, pickle.dumps({'metainfo': {}, 'data_list': []}))
    hit = [p for p in V.validate('bevdepth', prepared) if p.path == str(path)]
    assert hit and 'v1.x' in hit[0].message


def test_info_pickles_of_the_other_model_or_missing_steps(prepared):
    # a BEVDepth list where FB-OCC expects its dict
    fb = prepared / 'bevdetv2-nuscenes_infos_val.pkl'
    replace_bytes(fb, (prepared / 'nuscenes_infos_val.pkl').read_bytes())
    hit = [p for p in V.validate('fbocc', prepared) if p.path == str(fb)]
    assert hit and 'plain list' in hit[0].message
    # mmdet3d's converter output without FB-BEV's add_ann_adj_info step
    tr = prepared / 'bevdetv2-nuscenes_infos_train.pkl'
    obj = pickle.loads(tr.read_bytes())
    for info in obj['infos']:
        for k in ('ann_infos', 'scene_name', 'occ_path', 'prev'):
            info.pop(k)
    replace_bytes(tr, pickle.dumps(obj))
    hit = [p for p in V.validate('fbocc', prepared) if p.path == str(tr)]
    assert hit and 'add_ann_adj_info' in hit[0].message


def test_stale_info_pickle(prepared):
    path = prepared / 'nuscenes_infos_train.pkl'
    infos = pickle.loads(path.read_bytes())
    for info in infos:
        info['sample_token'] = 'f' * 32
    replace_bytes(path, pickle.dumps(infos))
    hit = [p for p in V.validate('bevdepth', prepared) if p.path == str(path)]
    assert hit and 'not in v1.0-trainval' in hit[0].message


def test_depth_gt_files(prepared, nusc):
    folder = prepared / 'depth_gt'
    folder.mkdir()
    from nuscenes.utils import splits
    for sd in nusc.sample_data:
        sample = nusc.get('sample', sd['sample_token'])
        if sd['filename'].endswith('.jpg') and nusc.get('scene', sample['scene_token'])['name'] in splits.train:
            (folder / (sd['filename'].split('/')[-1] + '.bin')).write_bytes(
                np.array([[10, 20, 5.0]], '<f4').tobytes())
    assert V.validate('bevdepth', prepared, full=True) == []
    victim = sorted(folder.glob('*.bin'))[0]
    victim.write_bytes(b'\0' * 10)
    hit = [p for p in V.validate('bevdepth', prepared, full=True) if p.path == str(victim)]
    assert hit and 'truncated' in hit[0].message


def test_wrong_data_root_suggests_the_right_one(root):
    problems = V.validate('fbocc', root.parent)
    assert len(problems) == 1
    assert 'no v1.0-trainval here' in problems[0].message and str(root) in problems[0].fix
    problems = V.validate('bevdepth', root / 'v1.0-trainval')
    assert len(problems) == 1 and str(root) in problems[0].fix
    problems = V.validate('fbocc', root / 'does-not-exist')
    assert 'does not exist' in problems[0].message and 'bevkit.data.synthetic' in problems[0].fix


def test_table_problems(prepared):
    (prepared / 'v1.0-trainval' / 'instance.json').unlink()
    replace_bytes(prepared / 'v1.0-trainval' / 'log.json', b'[{"token": "x"')
    paths = _paths(V.validate('bevdepth', prepared))
    assert str(prepared / 'v1.0-trainval' / 'instance.json') in paths
    assert str(prepared / 'v1.0-trainval' / 'log.json') in paths


def test_many_problems_of_one_kind_are_summarised(prepared):
    for img in sorted((prepared / 'samples' / 'CAM_FRONT').glob('*.jpg')):
        img.unlink()
    problems = V.validate('fbocc', prepared, full=True)
    missing = [p for p in problems if p.message.startswith('missing file')]
    assert len(missing) == V.MAX_PER_KIND
    assert [p for p in problems if p.path == '(more)' and 'missing sensor file' in p.message]


def test_cli_exit_codes(prepared, capsys):
    assert V.main(['--model', 'fbocc', str(prepared)]) == 0
    assert 'OK' in capsys.readouterr().out
    (prepared / 'bevdetv2-nuscenes_infos_val.pkl').unlink()
    assert V.main(['--model', 'fbocc', str(prepared)]) == 1
    out = capsys.readouterr().out
    assert 'bevdetv2-nuscenes_infos_val.pkl' in out and 'fix:' in out
    with pytest.raises(ValueError):
        V.validate('bevfusion', prepared)


def test_fast_mode_on_tables_too_big_to_parse(prepared, monkeypatch):
    """Real trainval tables are GBs: the fast mode scans sample_data.json for keyframe files and
    only checks that the other big tables are whole JSON lists."""
    monkeypatch.setattr(V, 'FAST_TABLE_BYTES', 0)
    monkeypatch.setattr(V, 'FAST_SAMPLES', 10**6)
    assert V.validate('fbocc', prepared) == []
    img = _first_file(prepared, 'samples/CAM_FRONT_LEFT', '*.jpg')
    img.unlink()
    ann = prepared / 'v1.0-trainval' / 'sample_annotation.json'
    replace_bytes(ann, ann.read_bytes()[:-50])
    paths = _paths(V.validate('fbocc', prepared))
    assert str(img) in paths and str(ann) in paths


def test_missing_devkit_is_a_problem_not_a_crash(root, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'nuscenes.utils.splits', None)
    problems = V.validate('fbocc', root)
    assert len(problems) == 1 and 'nuscenes-devkit' in problems[0].message
    assert 'setup.sh' in problems[0].fix


@pytest.mark.parametrize('stored, expected', [
    (lambda data, p: 'runs/synthetic-nuscenes/' + p, 'made for another layout'),
    (lambda data, p: str(data) + '-moved/' + p, 'point outside the data root'),
    (lambda data, p: '../elsewhere/' + p, 'point outside the data root'),
    (lambda data, p: str(data) + '/' + p, None),  # absolute inside the root (an older kit's preparation): fine
])
def test_fbocc_infos_must_hold_paths_in_the_data_root(prepared, stored, expected):
    """FB-OCC opens lidar_path/data_path joined with the data root: a path made for another layout, or one that
    points outside the data root (training would read another copy), is caught before training."""
    path = prepared / 'bevdetv2-nuscenes_infos_train.pkl'
    with open(path, 'rb') as f:
        obj = pickle.load(f)
    assert all(not info['lidar_path'].startswith('/') for info in obj['infos'])  # the kit writes relative paths
    for info in obj['infos']:
        info['lidar_path'] = stored(prepared, info['lidar_path'])
    with open(path, 'wb') as f:
        pickle.dump(obj, f)
    problems = [p for p in V.validate('fbocc', prepared) if p.path == str(path)]
    if expected is None:
        assert problems == []
        return
    assert problems and expected in problems[0].message and '--force' in problems[0].fix
    if 'outside' in expected:  # one line for the file, naming the first such entry
        assert len(problems) == 1 and obj['infos'][0]['lidar_path'] in problems[0].message
    assert V.validate('bevdepth', prepared) == []  # BEVDepth's infos are untouched
