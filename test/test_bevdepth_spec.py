"""BEVDepth's launcher spec, scripts and depth-GT tool: no upstream, no torch model needed."""
from __future__ import annotations

import os
import pickle
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from bevkit import REPO_ROOT
from bevkit.models import LaunchRequest, get_spec

UPSTREAM_SUBPACKAGES = {"callbacks", "datasets", "evaluators", "exps", "layers", "models", "ops", "utils"}


def _request(tmp_path, mode, **over):
    base = dict(mode=mode, device="npu", data_root=tmp_path / "data", run_dir=tmp_path / "run",
                nproc_per_node=8, nnodes=1)
    base.update(over)
    return LaunchRequest(**base)


def test_model_folder_never_shadows_upstream_package():
    """Upstream `bevdepth` is a namespace package: our bevdepth/ folder joins it when the repo root is on
    sys.path, so it must hold no __init__.py and none of upstream's subpackage names."""
    folder = REPO_ROOT / "bevdepth"
    assert not (folder / "__init__.py").exists()
    clash = {p.name for p in folder.iterdir()} & UPSTREAM_SUBPACKAGES
    assert not clash, f"bevdepth/ must not contain {sorted(clash)}"


def test_full_entry_is_reference_recipe(tmp_path):
    spec = get_spec("bevdepth")
    argv = spec.build_entry(_request(tmp_path, "full"))
    assert argv[0] == str(REPO_ROOT / "bevdepth" / "run.py")
    assert argv[1].endswith("bevdepth/configs/bev_depth_lss_r50_256x704_128x128_24e_2key.py")
    joined = " ".join(argv)
    assert "--device npu" in joined and "-b 8" in joined and "--max_epochs 24" in joined
    assert f"--default_root_dir {tmp_path / 'run'}" in joined
    assert f"--data_root {tmp_path / 'data'}" in joined
    assert "-e" not in argv
    assert spec.batch_per_device(_request(tmp_path, "full")) == 8
    for mode, path in spec.configs.items():
        assert (REPO_ROOT / path).is_file(), (mode, path)


def test_performance_is_one_epoch_and_user_args_win(tmp_path):
    spec = get_spec("bevdepth")
    argv = spec.build_entry(_request(tmp_path, "performance"))
    assert "--max_epochs 1" in " ".join(argv)
    request = _request(tmp_path, "performance", extra_args=("-b", "4", "--max_epochs", "2"))
    argv = spec.build_entry(request)
    assert argv.count("-b") == 1 and argv.count("--max_epochs") == 1
    assert argv[-4:] == ["-b", "4", "--max_epochs", "2"]
    assert spec.batch_per_device(request) == 4


def test_eval_defaults_to_newest_checkpoint_of_newest_full_run(tmp_path, monkeypatch):
    spec = get_spec("bevdepth")
    full = tmp_path / "full"
    monkeypatch.setenv("BEVKIT_FULL_WORK_DIR", str(full))
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        spec.build_entry(_request(tmp_path, "eval"))
    old = full / "20240101-000000" / "lightning_logs" / "version_0" / "checkpoints" / "epoch=23-step=10536.ckpt"
    old.parent.mkdir(parents=True)
    old.write_text("x")
    time.sleep(0.02)
    new_run = full / "20240102-000000" / "lightning_logs" / "version_3" / "checkpoints"
    new_run.mkdir(parents=True)
    (new_run / "epoch=0-step=1.ckpt").write_text("x")
    time.sleep(0.02)
    (new_run / "epoch=23-step=10536.ckpt").write_text("x")
    os.utime(full / "20240101-000000", (1, 1))  # the older run folder
    argv = spec.build_entry(_request(tmp_path, "eval"))
    assert argv[argv.index("--ckpt_path") + 1] == str(new_run / "epoch=23-step=10536.ckpt")
    assert "-e" in argv and "--max_epochs" not in argv
    chosen = tmp_path / "mine.ckpt"
    argv = spec.build_entry(_request(tmp_path, "eval", checkpoint=chosen))
    assert argv[argv.index("--ckpt_path") + 1] == str(chosen)


def test_smoke_entry_is_tiny_and_evaluates(tmp_path):
    spec = get_spec("bevdepth")
    request = _request(tmp_path, "smoke", device="cpu", nproc_per_node=2)
    argv = spec.build_entry(request)
    assert argv[1].endswith("bevdepth/configs/bev_depth_tiny_smoke.py")
    assert "--evaluate_after_fit" in argv and "-b 2" in " ".join(argv)
    assert spec.batch_per_device(request) == 2


def test_demo_entry_trains_the_demo_experiment_and_evaluates(tmp_path, monkeypatch):
    import bevkit.models.bevdepth as bevdepth

    spec = get_spec("bevdepth")
    request = _request(tmp_path, "demo", device="cpu", nproc_per_node=2)
    argv = spec.build_entry(request)
    assert argv[1] == str(REPO_ROOT / spec.configs["demo"]) and "--evaluate_after_fit" in argv
    assert argv[argv.index("-b") + 1] == str(bevdepth.DEMO_BATCH_PER_DEVICE) == str(spec.batch_per_device(request))
    if bevdepth.DEMO_EPOCHS is not None:
        assert argv[argv.index("--max_epochs") + 1] == str(bevdepth.DEMO_EPOCHS)
    monkeypatch.setattr(bevdepth, "DEMO_EPOCHS", None)  # the experiment decides its own schedule
    assert "--max_epochs" not in spec.build_entry(request)


@pytest.mark.parametrize("script,mode", [("train_8p_full.sh", "full"), ("train_8p_performance.sh", "performance"),
                                         ("eval.sh", "eval")])
def test_scripts_dry_run(script, mode, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    args = [str(REPO_ROOT / "bevdepth" / "test" / script)]
    if mode == "eval":
        args.append(str(tmp_path / "some.ckpt"))
    args += ["--data-root", str(data), "--device", "npu", "--dry-run", "--work-dir", str(tmp_path / "runs")]
    env = dict(os.environ, BEVKIT_CANN_SET_ENV="", ASCEND_TOOLKIT_HOME=str(tmp_path))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "bevdepth/run.py" in out and "--device npu" in out
    if mode == "eval":
        assert f"--ckpt_path {tmp_path / 'some.ckpt'}" in out
    else:
        assert "--nproc_per_node=8" in out and "-b 8" in out


# ------------------------------------------------------------------------------------------- depth GT

def _quat_z(yaw):
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


def _identity_pose():
    return {"rotation": [1.0, 0.0, 0.0, 0.0], "translation": [0.0, 0.0, 0.0]}


CAM_ROT = [0.5, -0.5, 0.5, -0.5]  # camera looking along ego +x (z forward, x right, y down)


def _sample(root: Path, name: str, points: np.ndarray):
    lidar_rel = f"samples/LIDAR_TOP/{name}.pcd.bin"
    (root / "samples" / "LIDAR_TOP").mkdir(parents=True, exist_ok=True)
    np.hstack([points, np.zeros((len(points), 2))]).astype(np.float32).tofile(root / lidar_rel)
    intrinsic = [[500.0, 0.0, 800.0], [0.0, 500.0, 450.0], [0.0, 0.0, 1.0]]
    cam = {"filename": f"samples/CAM_FRONT/{name}.jpg", "width": 1600, "height": 900,
           "calibrated_sensor": {"rotation": CAM_ROT, "translation": [0.0, 0.0, 0.0],
                                 "camera_intrinsic": intrinsic},
           "ego_pose": _identity_pose()}
    lidar = {"filename": lidar_rel, "calibrated_sensor": _identity_pose(), "ego_pose": _identity_pose()}
    return {"sample_token": name, "cam_infos": {"CAM_FRONT": cam}, "lidar_infos": {"LIDAR_TOP": lidar}}


def test_projection_known_points():
    from bevkit.data.depth_gt import project_lidar

    info = _sample(Path("/nonexistent"), "s", np.zeros((0, 3)))
    pts = np.array([[10.0, 0.0, 0.0],     # on the optical axis: (800, 450), depth 10
                    [20.0, -2.0, 1.0],    # right and up: u = 800 + 500*2/20, v = 450 - 500*1/20
                    [-5.0, 0.0, 0.0],     # behind the camera
                    [2.0, 10.0, 0.0]])    # far left, outside the image
    uvd = project_lidar(pts, info["lidar_infos"]["LIDAR_TOP"], info["cam_infos"]["CAM_FRONT"], (1600, 900))
    assert uvd.dtype == np.float32
    np.testing.assert_allclose(uvd, [[800, 450, 10], [850, 425, 20]], atol=1e-3)


def test_generate_writes_resumes_and_reads_back(tmp_path):
    from bevkit.data import depth_gt

    rng = np.random.default_rng(0)
    infos = [_sample(tmp_path, f"s{i}", rng.uniform([2, -20, -2], [50, 20, 2], size=(500, 3))) for i in range(3)]
    with open(tmp_path / "nuscenes_infos_train.pkl", "wb") as fh:
        pickle.dump(infos, fh)
    counts = depth_gt.generate(tmp_path, workers=2, progress=False)
    assert counts == {"samples": 3, "written": 3, "skipped": 0}
    out = depth_gt.output_path(tmp_path, "samples/CAM_FRONT/s1.jpg")
    assert out.name == "s1.jpg.bin"
    data = np.fromfile(out, dtype=np.float32).reshape(-1, 3)
    assert len(data) > 50 and (data[:, 2] > 0).all()
    assert ((data[:, 0] > 1) & (data[:, 0] < 1599) & (data[:, 1] > 1) & (data[:, 1] < 899)).all()
    before = out.stat().st_mtime_ns
    assert depth_gt.generate(tmp_path, workers=1, progress=False) == {"samples": 3, "written": 0, "skipped": 3}
    assert out.stat().st_mtime_ns == before
    assert not list((tmp_path / "depth_gt").glob("*.tmp"))
    out.unlink()
    assert depth_gt.generate(tmp_path, workers=1, progress=False)["written"] == 1


def test_depth_gt_cli_names_missing_infos(tmp_path, capsys):
    from bevkit.data import depth_gt

    assert depth_gt.main([str(tmp_path)]) == 1
    assert "nuscenes_infos_train.pkl" in capsys.readouterr().err
