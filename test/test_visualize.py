"""Pictures of predictions: the shared geometry, the dump (rank 0, count, atomic files), each model's evaluation
hook on fabricated evaluation inputs (what it dumps, in which frame), and the PNGs drawn from the dumps
(tools/visualize). No upstream code: the hooks wrap stand-ins of the methods they patch. About 15 s."""
from __future__ import annotations

import json
import math
import pickle
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

from bevkit import REPO_ROOT
from bevkit import visualize as vis
from bevkit.data.schema import OCC_FREE, OCC_ID, OCC_SHAPE

CAMS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
#: camera looking along ego +x: its z (optical axis) = ego x, its x (right) = ego -y, its y (down) = ego -z
FORWARD = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
K = np.array([[100.0, 0.0, 80.0], [0.0, 100.0, 45.0], [0.0, 0.0, 1.0]])


def _quaternion(rotation):
    from pyquaternion import Quaternion

    return list(Quaternion(matrix=rotation).elements)


def _yaw_quaternion(yaw):
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    monkeypatch.setenv("BEVKIT_RUN_DIR", str(folder))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("BEVKIT_PREDICTION_SAMPLES", raising=False)
    return folder


def _image(path: Path) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((90, 160, 3), 120, np.uint8)).save(path)
    return str(path)


def test_geometry():
    from pyquaternion import Quaternion

    rng = np.random.default_rng(0)
    for q in rng.normal(size=(5, 4)):
        q /= np.linalg.norm(q)
        assert vis.quaternion_matrix(q) == pytest.approx(Quaternion(q).rotation_matrix, abs=1e-12)
    # a camera 1.5 m above the ego origin looking forward, ego 100 m along global x, camera ego = ego
    ego2global = vis.pose(_yaw_quaternion(0.0), [100.0, 0.0, 0.0])
    m = vis.ego_to_image(K, vis.pose(_quaternion(FORWARD), [0.0, 0.0, 1.5]), ego2global, ego2global)
    uv, z = vis.project(np.array([[10.0, 0.0, 1.5], [10.0, 1.0, 1.5], [10.0, 0.0, 0.5]]), m)
    assert z == pytest.approx([10.0, 10.0, 10.0])
    assert uv == pytest.approx(np.array([[80.0, 45.0], [70.0, 45.0], [80.0, 55.0]]))  # left is -u, down is +v
    assert vis.focal_length(m) == pytest.approx(100.0)
    # a box 4 m long, 2 m wide, 1 m high, turned to face +y: its length runs along y
    corners = vis.box_corners(np.array([[1.0, 2.0, 0.5, 4.0, 2.0, 1.0, math.pi / 2]]))[0]
    assert corners.min(0) == pytest.approx([0.0, 0.0, 0.0]) and corners.max(0) == pytest.approx([2.0, 4.0, 1.0])
    assert corners[0] == pytest.approx([0.0, 4.0, 0.0])  # corner 0: front-left-bottom (+length, +width)
    assert vis.box_corners(np.zeros((0, 9))).shape == (0, 8, 3)


def test_dumper_writes_on_rank_0_only_and_counts(run_dir, monkeypatch):
    monkeypatch.setenv("BEVKIT_PREDICTION_SAMPLES", "2")
    dumper = vis.Dumper()
    assert dumper.wanted() == 2
    paths = [dumper.save(f"t{i}", {"index": np.array(i)}) for i in range(3)]
    assert paths[2] is None and sorted(p.name for p in (run_dir / "predictions").iterdir()) == ["t0.npz", "t1.npz"]
    dumper.restart()  # a later evaluation pass replaces the earlier one's files
    assert dumper.wanted() == 2
    monkeypatch.setenv("RANK", "1")
    assert vis.Dumper().wanted() == 0 and vis.Dumper().save("t9", {}) is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("BEVKIT_PREDICTION_SAMPLES", "0")
    assert vis.Dumper().wanted() == 0


def _occupancy():
    sem = np.full(OCC_SHAPE, OCC_FREE, np.uint8)
    sem[:, :, 2] = OCC_ID["driveable_surface"]
    sem[170:180, 170:180, 3:6] = OCC_ID["car"]  # a car around x = +30 m, y = +30 m (front left)
    mask = np.ones(OCC_SHAPE, bool)
    mask[:, :100] = False  # the right half (y < 0) unseen
    return sem, mask


def test_fbocc_hook_dumps_what_the_evaluator_scores_and_draws_it(run_dir, monkeypatch, tmp_path):
    from bevkit.models.fbocc import pictures

    monkeypatch.setenv("BEVKIT_PREDICTION_SAMPLES", "2")
    sem, mask = _occupancy()
    infos = []
    for i in range(4):
        token = f"tok{i}"
        folder = tmp_path / "gts" / "scene-1" / token
        folder.mkdir(parents=True)
        np.savez(folder / "labels.npz", semantics=sem, mask_camera=mask, mask_lidar=mask)
        cams = {c: {"data_path": _image(tmp_path / "samples" / c / f"{token}.jpg"), "cam_intrinsic": K,
                    "sensor2ego_rotation": _quaternion(FORWARD), "sensor2ego_translation": [1.0, 0.0, 1.5],
                    "ego2global_rotation": _yaw_quaternion(0.3), "ego2global_translation": [5.0, 6.0, 0.0]}
                for c in CAMS}
        infos.append({"token": token, "scene_name": "scene-1", "cams": cams, "ego2global_rotation":
                      _yaw_quaternion(0.3), "ego2global_translation": [5.0, 6.0, 0.0]})
    dataset = types.SimpleNamespace(data_infos=infos, occupancy_path=str(tmp_path / "gts"))
    results = [{"index": i, "pred_occupancy": sem.astype(np.int64)} for i in (2, 0, 1, 3, 0)]
    evaluated = pictures.dump_on_evaluate_occupancy(lambda self, r, **kw: ("scored", len(r)))
    assert evaluated(dataset, results) == ("scored", 5)  # the evaluation itself is untouched
    files = vis.prediction_files(run_dir)
    assert [f.name for f in files] == ["tok0.npz", "tok3.npz"]  # spread over the split: first and last
    with np.load(files[0]) as sample:
        assert (sample["pred"] == sem).all() and (sample["gt"] == sem).all() and (sample["mask_camera"] == mask).all()
        assert list(sample["cameras"]) == list(CAMS) and sample["ego2img"].shape == (6, 4, 4)
        uv, z = vis.project(np.array([[11.0, 0.0, 1.5]]), sample["ego2img"][1])  # 10 m ahead of the camera
        assert uv[0] == pytest.approx([80.0, 45.0]) and z[0] == pytest.approx(10.0)
    # the top-down view: forward up, left to the left; unseen columns greyed
    top = pictures.top_down(sem)
    assert top[175, 175] == OCC_ID["car"] and top[0, 0] == OCC_ID["driveable_surface"]
    image = pictures.bev_image(top, mask.any(axis=2))
    car = np.array(vis.CLASS_COLOURS["car"], np.uint8)
    assert (image[24, 24] == car).all()  # x = +30 (upper rows), y = +30 (left columns)
    assert not (image[24, 175] == image[24, 24]).all()
    (run_dir / "launch.json").write_text(json.dumps({"request": {"model": "fbocc"}}))
    out = subprocess.run([str(REPO_ROOT / "tools" / "visualize"), str(run_dir), "--samples", "1"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    pngs = sorted((run_dir / "pictures").glob("*.png"))
    assert [p.name for p in pngs] == ["tok0_occupancy_bev.png", "tok0_occupancy_cameras.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10000 for p in pngs)


def _bevdepth_exp(tmp_path, torch):
    classes = ["car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
               "pedestrian", "traffic_cone"]
    backbone = torch.nn.Module()
    backbone.depth_net = torch.nn.Conv2d(3, 14 + 4, 1)
    with torch.no_grad():  # every pixel: depth bin 3 of [2, 58) in 4 m bins, i.e. 14 m
        backbone.depth_net.weight.zero_()
        backbone.depth_net.bias.zero_()
        backbone.depth_net.bias[3] = 30.0
    backbone.d_bound, backbone.depth_channels = [2.0, 58.0, 4.0], 14
    model = torch.nn.Module()
    model.backbone = backbone
    ego = {"translation": [100.0, 200.0, 0.0], "rotation": _yaw_quaternion(math.pi / 2)}
    sensor = {"translation": [1.0, 0.0, 1.5], "rotation": _quaternion(FORWARD), "camera_intrinsic": K.tolist()}
    info = {"sample_token": "s1",
            "cam_infos": {c: {"filename": f"samples/{c}/s1.jpg", "calibrated_sensor": sensor, "ego_pose": ego}
                          for c in CAMS},
            "ann_infos": [  # a car 10 m ahead of the ego (the ego faces global +y), a car without points, a cone
                {"category_name": "vehicle.car", "num_lidar_pts": 3, "num_radar_pts": 0,
                 "translation": [100.0, 210.0, 0.8], "size": [1.9, 4.5, 1.6], "rotation": _yaw_quaternion(math.pi / 2)},
                {"category_name": "vehicle.car", "num_lidar_pts": 0, "num_radar_pts": 0,
                 "translation": [90.0, 200.0, 0.8], "size": [1.9, 4.5, 1.6], "rotation": _yaw_quaternion(0.0)},
                {"category_name": "movable_object.trafficcone", "num_lidar_pts": 1, "num_radar_pts": 0,
                 "translation": [95.0, 205.0, 0.5], "size": [0.4, 0.4, 1.0], "rotation": _yaw_quaternion(0.0)}]}
    for c in CAMS:
        _image(tmp_path / "data" / "samples" / c / "s1.jpg")
    infos_path = tmp_path / "data" / "nuscenes_infos_val.pkl"
    infos_path.write_bytes(pickle.dumps([info]))
    exp = types.SimpleNamespace(model=model, ida_aug_conf={"cams": list(CAMS)}, val_info_paths=str(infos_path),
                                img_conf={"img_mean": [100.0, 110.0, 120.0], "img_std": [50.0, 50.0, 50.0],
                                          "to_rgb": True}, class_names=classes, data_root=str(tmp_path / "data"))
    return exp, ego


def test_bevdepth_hook_dumps_boxes_depth_and_ground_truth_and_draws_them(run_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from bevkit.models.bevdepth import pictures

    exp, ego = _bevdepth_exp(tmp_path, torch)
    sweep_imgs = torch.zeros(1, 2, 6, 3, 8, 24)
    # CAM_FRONT's key-frame input, channel 0: 100 + 1 x 50 after denormalizing; the dataset swapped PIL's RGB
    # (to_rgb=True), so channel 0 is blue
    sweep_imgs[0, 0, 1, 0] = 1.0
    meta = {"token": "s1", "ego2global_translation": np.array(ego["translation"]),
            "ego2global_rotation": np.array(ego["rotation"])}
    boxes = np.array([[10.0, 0.2, 0.8, 4.4, 1.9, 1.6, 0.0, 0.0, 0.0]], np.float32)

    def eval_step(self, batch, batch_idx, prefix):  # upstream's: one forward per sweep, key frame first
        imgs = batch[0]
        for sweep in range(imgs.shape[1]):
            self.model.backbone.depth_net(imgs[:, sweep].flatten(0, 1))
        return [[boxes, np.array([0.8], np.float32), np.array([0], np.int32), meta]]

    hooked = pictures.dump_on_eval_step(eval_step)
    results = hooked(exp, (sweep_imgs, {}, None, [meta], None, None), 0, "test")
    assert results[0][0] is boxes and not exp.model.backbone.depth_net._forward_hooks  # the hook is gone
    with np.load(run_dir / "predictions" / "s1.npz") as sample:
        assert sample["boxes"] == pytest.approx(boxes) and list(sample["classes"])[0] == "car"
        gt = sample["gt_boxes"]  # one car (the point-less one and nothing else is dropped but the cone)
        assert list(sample["gt_labels"]) == [0, 9]
        assert gt[0, :3] == pytest.approx([10.0, 0.0, 0.8], abs=1e-5)  # 10 m ahead in the ego frame
        assert gt[0, 3:6] == pytest.approx([4.5, 1.9, 1.6]) and gt[0, 6] == pytest.approx(0.0, abs=1e-6)
        assert sample["depth"].shape == (8, 24) and float(sample["depth"].mean()) == pytest.approx(14.0, abs=0.05)
        assert str(sample["depth_camera"]) == "CAM_FRONT" and sample["depth_input"][0, 0].tolist() == [120, 110, 150]
        uv, z = vis.project(gt[:1, :3], sample["ego2img"][1])
        assert uv[0] == pytest.approx([80.0, 45.0 + 100 * 0.7 / 9.0]) and z[0] == pytest.approx(9.0)
    # predict passes dump nothing (the test split has no ground truth)
    (run_dir / "predictions" / "s1.npz").unlink()
    hooked(exp, (sweep_imgs, {}, None, [meta], None, None), 0, "predict")
    assert not (run_dir / "predictions" / "s1.npz").exists()
    hooked(exp, (sweep_imgs, {}, None, [meta], None, None), 0, "test")
    (run_dir / "launch.json").write_text(json.dumps({"request": {"model": "bevdepth"}}))
    written = vis.render_run(run_dir, samples=1, options={"score_threshold": 0.5})
    assert [p.name for p in written] == ["s1_boxes_bev.png", "s1_boxes_cameras.png", "s1_depth.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_visualize_without_predictions_says_how_to_get_them(tmp_path):
    out = subprocess.run([str(REPO_ROOT / "tools" / "visualize"), str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "no predictions in" in out.stderr and "evaluate with the launcher" in out.stderr
