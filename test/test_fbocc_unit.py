"""FB-OCC kit pieces that need neither the upstream source nor a device: launcher spec, config helpers,
data-preparation checks, scripts and the patch file itself."""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import stat
from pathlib import Path

import pytest

from bevkit.models import LaunchRequest, get_spec

REPO = Path(__file__).resolve().parents[1]
PATCH = REPO / "fbocc" / "fbocc.patch"


def _request(mode, tmp_path, **kw):
    return LaunchRequest(mode=mode, device="npu", data_root=tmp_path / "nus", run_dir=tmp_path / "run",
                         nproc_per_node=8, nnodes=1, **kw)


def test_spec_train_argv(tmp_path):
    spec = get_spec("fbocc")
    argv = spec.build_entry(_request("full", tmp_path))
    assert argv[0] == "tools/train.py"
    assert argv[1].endswith("fbocc/configs/fbocc_r50_8p.py") and Path(argv[1]).is_file()
    assert argv[argv.index("--launcher") + 1] == "pytorch"
    assert argv[argv.index("--work-dir") + 1] == str(tmp_path / "run")
    assert "--cfg-options" not in argv  # the data root goes through BEVKIT_DATA_ROOT (test_bad_inputs: commas)
    assert spec.batch_per_device(_request("full", tmp_path)) == 4
    assert spec.batch_per_device(_request("smoke", tmp_path)) == 1


def test_spec_eval_needs_checkpoint_and_merges_cfg_options(tmp_path):
    spec = get_spec("fbocc")
    with pytest.raises(ValueError, match="checkpoint"):
        spec.build_entry(_request("eval", tmp_path))
    argv = spec.build_entry(_request("eval", tmp_path, checkpoint=tmp_path / "w.pth",
                                     extra_args=("--cfg-options", "sync_bn=True", "--seed", "1")))
    assert argv[:3] == ["tools/test.py", argv[1], str(tmp_path / "w.pth")]
    assert argv[argv.index("--eval") + 1] == "mIoU"
    assert argv.count("--cfg-options") == 1  # argparse would keep only the last one
    opts = argv[argv.index("--cfg-options") + 1:argv.index("--seed")]
    assert opts == ["sync_bn=True"]
    with pytest.raises(ValueError, match="--data-root"):
        spec.build_entry(_request("full", tmp_path, extra_args=("--cfg-options", "data_root=/elsewhere/")))


def test_spec_custom_config_batch(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("_base_ = ['./base.py']\n")
    (tmp_path / "base.py").write_text("samples_per_gpu = 3\n")
    assert get_spec("fbocc").batch_per_device(_request("full", tmp_path, config=cfg)) == 3


def test_eval_batch_is_what_tools_test_uses(tmp_path):
    """tools/test.py evaluates 1 sample per device whatever the config trains with: an eval dry run used to
    print the training batch ("batch 4/device, global batch 32")."""
    from bevkit import launch

    spec = get_spec("fbocc")
    config = REPO / "fbocc/configs/fbocc_r50_8p.py"
    assert spec.batch_per_device(_request("eval", tmp_path, config=config, checkpoint=tmp_path / "w.pth")) == 1
    assert spec.batch_per_device(_request("full", tmp_path, config=config)) == 4
    (tmp_path / "data").mkdir()
    plan = launch.make_plan(launch.parse(["--model", "fbocc", "--mode", "eval", "--device", "cpu", "--dry-run",
                                          "--checkpoint", str(tmp_path / "w.pth"), "--data-root",
                                          str(tmp_path / "data"), "--master-port", "29501"]))
    assert "batch 1/device, global batch 8" in plan.notes[0] and plan.env_set["BEVKIT_SAMPLES_PER_DEVICE"] == "1"


def test_configs_pin_the_reference_recipe():
    text = (REPO / "fbocc/configs/fbocc_r50_8p.py").read_text()
    assert re.search(r"^num_gpus = 8$", text, re.M) and re.search(r"^samples_per_gpu = 4$", text, re.M)
    # 28130 // 32 * 4.554 -> 4002 iterations per epoch, 20 epochs
    assert int(28130 // (8 * 4) * 4.554) * 20 == 80040
    perf = (REPO / "fbocc/configs/fbocc_r50_8p_performance.py").read_text()
    assert "performance_iters = 600" in perf


def test_sync_bn_policy():
    from bevkit.models.fbocc.config import sync_bn_policy

    assert sync_bn_policy("npu", 8) == "sync"
    assert sync_bn_policy("cuda", 2) == "sync"
    assert sync_bn_policy("cuda", 1) == "local"
    assert sync_bn_policy("cpu", 2) == "local"


def test_rebase_data_paths_follow_data_root(tmp_path):
    mmcv = pytest.importorskip("mmcv")
    from bevkit.models.fbocc.config import propagate_shared, rebase_data_paths

    cfg = mmcv.Config(dict(
        data_root="data/nuscenes/", occupancy_path="/mount/x/gts", load_from="ckpts/r50_256x705_depth_pretrain.pth",
        data_config=dict(input_size=(128, 352)),
        model=dict(img_backbone=dict(pretrained="ckpts/resnet50-0676ba61.pth")),
        data=dict(train=dict(ann_file="data/nuscenes/bevdetv2-nuscenes_infos_train.pkl", data_root="data/nuscenes/",
                             pipeline=[dict(type="PrepareImageInputs", data_config=dict(input_size=(256, 704))),
                                       dict(type="LoadOccupancy", occupancy_path="/mount/x/gts")]),
                  val=dict(ann_file="data/nuscenes/bevdetv2-nuscenes_infos_val.pkl", occupancy_path="/mount/x"))))
    root = tmp_path / "nus"
    (root / "ckpts").mkdir(parents=True)
    cfg.merge_from_dict({"data_root": str(root)})
    fresh = cfg.copy()
    rebase_data_paths(cfg)
    assert cfg.data.train.ann_file == f"{root}/bevdetv2-nuscenes_infos_train.pkl"
    assert cfg.data.val.ann_file == f"{root}/bevdetv2-nuscenes_infos_val.pkl"
    assert cfg.data.train.pipeline[1].occupancy_path == f"{root}/gts" == cfg.data.val.occupancy_path
    assert cfg.load_from == f"{root}/ckpts/r50_256x705_depth_pretrain.pth"
    assert cfg.model.img_backbone.pretrained == f"{root}/ckpts/resnet50-0676ba61.pth"
    (root / "ckpts").rmdir()  # no DATA_ROOT/ckpts: checkpoints stay where upstream expects them
    rebase_data_paths(fresh)
    assert fresh.load_from == "ckpts/r50_256x705_depth_pretrain.pth"
    assert fresh.data.train.ann_file == f"{root}/bevdetv2-nuscenes_infos_train.pkl"
    assert propagate_shared(cfg) and cfg.data.train.pipeline[0].data_config.input_size == (128, 352)


def test_rebase_keeps_paths_the_user_chose(tmp_path):
    """Only paths that still point at upstream's default data folder follow data_root: a user's
    --cfg-options data.val.ann_file=... (or occupancy_path=...) is kept."""
    mmcv = pytest.importorskip("mmcv")
    from bevkit.models.fbocc.config import rebase_data_paths

    cfg = mmcv.Config(dict(
        data_root="data/nuscenes/", occupancy_path="data/nuscenes/gts",
        data=dict(train=dict(ann_file="data/nuscenes/bevdetv2-nuscenes_infos_train.pkl",
                             occupancy_path="data/nuscenes/gts"),
                  val=dict(ann_file="data/nuscenes/bevdetv2-nuscenes_infos_val.pkl",
                           occupancy_path="data/nuscenes/gts"))))
    root = tmp_path / "nus"
    mine = str(tmp_path / "elsewhere" / "my_val_infos.pkl")
    cfg.merge_from_dict({"data_root": str(root), "data.val.ann_file": mine,
                         "occupancy_path": str(tmp_path / "my_gts")})
    changed = rebase_data_paths(cfg)
    assert cfg.data.val.ann_file == mine and mine not in changed  # kept
    assert cfg.data.train.ann_file == f"{root}/bevdetv2-nuscenes_infos_train.pkl"  # followed data_root
    assert cfg.occupancy_path == str(tmp_path / "my_gts")  # kept, and the datasets follow it
    assert cfg.data.train.occupancy_path == cfg.data.val.occupancy_path == str(tmp_path / "my_gts")


def test_device_policy_cpu_drops_fp16_and_uses_gloo():
    mmcv = pytest.importorskip("mmcv")
    from bevkit.models.fbocc.config import device_policy

    cfg = mmcv.Config(dict(fp16=dict(loss_scale="dynamic"), sync_bn=True, dist_params=dict(backend="nccl")))
    device_policy(cfg, "cpu", 2)
    assert cfg.fp16 is None and cfg.sync_bn is False and cfg.dist_params.backend == "gloo"
    cfg = mmcv.Config(dict(fp16=dict(loss_scale="dynamic"), sync_bn=True, dist_params=dict(backend="nccl")))
    device_policy(cfg, "npu", 8)
    assert cfg.fp16 == dict(loss_scale="dynamic") and cfg.sync_bn is True and cfg.dist_params.backend == "hccl"


def test_checkpoint_check_messages_and_hash(tmp_path):
    from bevkit.models.fbocc import prepare

    problems = prepare.check_checkpoints(tmp_path)
    assert len(problems) == 2 and all("wget" in p for p in problems)
    (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"not the torchvision file")
    (tmp_path / "r50_256x705_depth_pretrain.pth").write_bytes(b"depth")
    problems = prepare.check_checkpoints(tmp_path)
    assert len(problems) == 1 and "0676ba61" in problems[0]
    (tmp_path / "resnet50-0676ba61.pth").unlink()
    prepare.check_checkpoints(tmp_path)  # records the depth-pretrain sha256 on first use
    sums = (tmp_path / prepare.SUMS_FILE).read_text()
    assert hashlib.sha256(b"depth").hexdigest() in sums
    (tmp_path / "r50_256x705_depth_pretrain.pth").write_bytes(b"changed")
    assert any("does not match the recorded" in p for p in prepare.check_checkpoints(tmp_path))


def test_occ3d_check(tmp_path):
    from bevkit.models.fbocc import prepare

    root = tmp_path / "nus"
    root.mkdir()
    assert "missing Occ3D" in prepare.check_occ3d(root)[0]
    infos = [{"scene_name": "scene-0001", "token": "a"}, {"scene_name": "scene-0001", "token": "b"}]
    with open(prepare.info_path(root, "val"), "wb") as f:
        pickle.dump({"infos": infos}, f)
    occ = tmp_path / "occ3d"
    (occ / "scene-0001" / "a").mkdir(parents=True)
    (occ / "scene-0001" / "a" / "labels.npz").write_bytes(b"")
    problems = prepare.check_occ3d(root, occ)
    assert (root / "gts").is_symlink() and len(problems) == 1 and "1 of 2 val samples" in problems[0]
    (occ / "scene-0001" / "b").mkdir()
    (occ / "scene-0001" / "b" / "labels.npz").write_bytes(b"")
    assert prepare.check_occ3d(root) == []


def test_metrics_from_evaluate_output():
    from bevkit.models.fbocc.results import OCC3D_CLASSES, occupancy_metrics

    out = {name: float(i) for i, name in enumerate(OCC3D_CLASSES)}
    out["bus"] = float("nan")
    out["Overall"] = 7.5
    metrics = occupancy_metrics(out)
    assert metrics["miou"] == 7.5 and metrics["per_class_iou"]["bus"] is None
    assert metrics["per_class_iou"]["vegetation"] == 16.0 and len(metrics["per_class_iou"]) == 17
    assert occupancy_metrics({"mAP": 1.0}) is None


@pytest.mark.parametrize("name", ["train_8p_full.sh", "train_8p_performance.sh", "eval.sh", "train_smoke.sh"])
def test_scripts_are_thin_launcher_wrappers(name):
    path = REPO / "fbocc" / "test" / name
    assert path.stat().st_mode & stat.S_IXUSR, f"{path} is not executable"
    text = path.read_text()
    assert "tools/launch" in text and "--model fbocc" in text


def test_patch_is_small_and_keeps_crlf():
    data = PATCH.read_bytes()
    files = re.findall(rb"^diff --git a/(\S+)", data, re.M)
    assert len(files) <= 16
    assert b"tools/train.py" in files and b"tools/test.py" in files
    assert b"activate(__file__)" in data
    # the two CRLF files of bevformer_utils keep CRLF on every added line
    for crlf in (b"spatial_cross_attention_depth.py", b"multi_scale_deformable_attn_function.py"):
        section = data.split(b"diff --git a/")[[i for i, f in enumerate(files) if f.endswith(crlf)][0] + 1]
        added = [line for line in section.split(b"\n") if line.startswith(b"+") and not line.startswith(b"+++")]
        assert added and all(line.endswith(b"\r") for line in added)


def test_sync_bn_policy_reverts_hard_coded_syncbn():
    pytest.importorskip("mmcv")
    import torch
    import torch.nn as nn

    from bevkit.compat import ensure_torchvision_importable

    ensure_torchvision_importable()  # mmcv.cnn imports torchvision (CUDA-built wheel on a CPU torch)
    from bevkit.models.fbocc.config import apply_sync_bn_policy

    def make():  # like FBOCC's history convs: a hard-coded nn.SyncBatchNorm on 5-D input
        return nn.Sequential(nn.Conv3d(4, 8, 1), nn.SyncBatchNorm(8), nn.ReLU())

    kept = apply_sync_bn_policy(make(), device="npu", world=8)
    assert isinstance(kept[1], nn.SyncBatchNorm)
    local = apply_sync_bn_policy(make(), device="cpu", world=2)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in local.modules())
    assert local(torch.randn(2, 4, 3, 5, 5)).shape == (2, 8, 3, 5, 5)  # BatchNorm that accepts 5-D input


@pytest.mark.parametrize("script,mode,entry", [("train_8p_full.sh", "full", "tools/train.py"),
                                               ("train_8p_performance.sh", "performance", "tools/train.py")])
def test_8p_scripts_dry_run_the_npu_command(script, mode, entry, tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([str(REPO / "fbocc" / "test" / script), "--data-root", str(tmp_path), "--device", "npu",
                           "--dry-run", "--no-data-check"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    command = proc.stdout
    assert "--nproc_per_node=8" in command and entry in command and "--launcher pytorch" in command
    assert f"BEVKIT_DATA_ROOT={tmp_path}" in command and "BEVKIT_DEVICE=npu" in command
    assert "fbocc_r50_8p" in command
    assert not any(tmp_path.iterdir())  # a dry run creates nothing


def test_wrapper_factory_keeps_class_semantics():
    from bevkit.models.fbocc.patches.device import _factory_class

    class Wrapper:  # stands in for MMDistributedDataParallel
        def __init__(self, module, device_ids=None, **kwargs):
            self.module, self.device_ids = module, device_ids

    class NpuWrapper(Wrapper):
        pass

    patched = _factory_class(Wrapper, lambda module, device_ids, **kw: NpuWrapper(module, device_ids=[3], **kw))
    made = patched("model", device_ids=[0])
    assert type(made) is NpuWrapper and made.device_ids == [3] and isinstance(made, Wrapper)

    class Later(patched):  # e.g. a wrapper class defined after activation
        pass

    later = Later("model", device_ids=[1])
    assert type(later) is Later and later.device_ids == [1]


def test_info_creation_never_runs_from_an_ancestor_of_the_data_root(tmp_path, monkeypatch):
    """mmdet3d's converter strips os.getcwd() from paths: run from an ancestor (the kit's runs/ folder holds
    the default smoke data) it would write paths that break when training runs from the FB-BEV checkout."""
    import sys
    import types

    from bevkit.models.fbocc import prepare, runtime

    data_root = tmp_path / "runs" / "synthetic-nuscenes"
    data_root.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    seen = {}
    fake = types.ModuleType("tools.create_data_bevdet")
    fake.nuscenes_data_prep = lambda **kw: seen.setdefault("prep", os.getcwd())
    fake.add_ann_adj_info = lambda prefix: seen.setdefault("adj", (os.getcwd(), Path("data/nuscenes").resolve()))
    monkeypatch.setitem(sys.modules, "tools.create_data_bevdet", fake)
    monkeypatch.setattr(runtime, "activate", lambda *a, **kw: "cpu")
    prepare.create_infos(data_root, tmp_path / "FB-BEV")
    for cwd in (seen["prep"], seen["adj"][0]):
        assert not str(data_root).startswith(cwd + os.sep), cwd
    assert seen["adj"][1] == data_root.resolve()  # upstream's hard-coded ./data/nuscenes is the data root
    assert os.getcwd() == str(tmp_path)


def test_prepare_sets_stale_infos_aside_and_recreates_them(tmp_path_factory, tmp_path, monkeypatch):
    """Infos training could not open (here: paths relative to another folder) are renamed, never deleted,
    and recreated; usable ones are kept."""
    pytest.importorskip("nuscenes")
    from nuscenes.nuscenes import NuScenes

    from bevkit.data.testing import hardlink_copy, small_dataset, write_fbocc_infos
    from bevkit.models.fbocc import prepare

    data = hardlink_copy(small_dataset(tmp_path_factory), tmp_path / "nuscenes")
    nusc = NuScenes("v1.0-trainval", str(data), verbose=False)
    fbbev = tmp_path / "FB-BEV"
    (fbbev / "tools").mkdir(parents=True)
    (fbbev / "tools" / "create_data_bevdet.py").write_text("")
    recreated = []

    def fake_create(data_root, fbbev_root):  # what upstream's converter writes, without importing it
        recreated.append(data_root)
        write_fbocc_infos(data_root, nusc)
        return [prepare.info_path(data_root, s) for s in prepare.SPLITS]

    monkeypatch.setattr(prepare, "create_infos", fake_create)
    write_fbocc_infos(data, nusc)
    train = prepare.info_path(data, "train")
    obj = pickle.loads(train.read_bytes())
    for info in obj["infos"]:
        info["lidar_path"] = "runs/elsewhere/" + info["lidar_path"]
    train.write_bytes(pickle.dumps(obj))
    stale_bytes = train.read_bytes()

    assert prepare.main([str(data), "--fbbev", str(fbbev), "--no-checkpoints"]) == 0
    assert recreated == [data]
    kept = list(data.glob("bevdetv2-nuscenes_infos_train.pkl.stale-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == stale_bytes
    assert prepare.stale_infos(data) == []

    assert prepare.main([str(data), "--fbbev", str(fbbev), "--no-checkpoints"]) == 0
    assert recreated == [data]  # usable infos are not recreated


def test_prepare_stores_info_paths_relative_to_the_data_root(tmp_path):
    """Upstream's converter writes absolute paths (DATA_ROOT joined with the file name); the kit rewrites those
    inside DATA_ROOT relative to it, so a copied or moved root reads its own files. Paths elsewhere are kept
    (the data check refuses them, naming the first); the file is rewritten only when something changed."""
    from bevkit.models.fbocc import prepare

    data = tmp_path / "nu,scenes"
    data.mkdir()
    cam = {"data_path": f"{data}/samples/CAM_FRONT/a.jpg", "type": "CAM_FRONT"}
    infos = {"infos": [{"token": "t0", "lidar_path": f"{data}/samples/LIDAR_TOP/a.pcd.bin", "cams": {"CAM_FRONT": cam},
                        "sweeps": [{"data_path": "/elsewhere/sweeps/LIDAR_TOP/b.pcd.bin"}],
                        "occ_path": "./data/nuscenes/gts/scene-0001/t0"}], "metadata": {"version": "v1.0"}}
    path = prepare.info_path(data, "train")
    path.write_bytes(pickle.dumps(infos))
    assert prepare.relativize_infos(path, data) == 2
    info = pickle.loads(path.read_bytes())["infos"][0]
    assert info["lidar_path"] == "samples/LIDAR_TOP/a.pcd.bin"
    assert info["cams"]["CAM_FRONT"]["data_path"] == "samples/CAM_FRONT/a.jpg"
    assert info["sweeps"][0]["data_path"] == "/elsewhere/sweeps/LIDAR_TOP/b.pcd.bin"
    assert info["occ_path"] == "./data/nuscenes/gts/scene-0001/t0"
    mtime = path.stat().st_mtime_ns
    assert prepare.relativize_infos(path, data) == 0 and path.stat().st_mtime_ns == mtime


def test_demo_trains_the_demo_config_with_its_own_batch(tmp_path):
    """--mode demo trains SPEC.configs['demo'] like a training run; its batch comes from that config (a kit config
    from the table, any other read with mmcv), so swapping the demo config is one line."""
    import bevkit.models.fbocc as fbocc

    spec = get_spec("fbocc")
    demo = REPO / spec.configs["demo"]
    argv = spec.build_entry(_request("demo", tmp_path, config=demo))
    assert argv[:2] == ["tools/train.py", str(demo)] and "--work-dir" in argv
    assert argv == spec.build_entry(_request("demo", tmp_path))  # the default config of the mode
    expected = fbocc.CONFIG_SAMPLES_PER_DEVICE.get(spec.configs["demo"])
    if expected is None:
        expected = fbocc._samples_per_gpu(demo)
    assert spec.batch_per_device(_request("demo", tmp_path)) == expected
    assert spec.smoke_eval_checkpoint == "latest.pth" and spec.pictures and spec.gates()["demo"]["checks"]


def test_demo_gate_describes_the_demo_config():
    """The demo gate's recipe (fbocc/reference.json) is the demo config's: a schedule change in one without the
    other would make every demo run warn that it is not comparable."""
    from mmcv import Config

    spec = get_spec("fbocc")
    cfg = Config.fromfile(str(REPO / spec.configs["demo"]))
    demo = spec.gates()["demo"]
    assert demo["steps"] == cfg.runner.max_iters
    assert demo["global_batch"] == 2 * cfg.data.samples_per_gpu       # the demo's 2 processes


def test_adamw_foreach_is_set_and_updates_bit_identically():
    """The port's AdamW(foreach=True): set by finalize unless the config says otherwise; the multi-tensor update is
    the same arithmetic as the per-tensor loop (float64 and float32 parameters, five steps: equal bit for bit)."""
    mmcv = pytest.importorskip("mmcv")
    import torch

    from bevkit.models.fbocc.config import foreach_optimizer

    cfg = mmcv.Config(dict(optimizer=dict(type="AdamW", lr=2e-4, weight_decay=1e-2)))
    assert foreach_optimizer(cfg) and cfg.optimizer.foreach is True
    mine = mmcv.Config(dict(optimizer=dict(type="AdamW", lr=2e-4, foreach=False)))
    assert not foreach_optimizer(mine) and mine.optimizer.foreach is False
    assert not foreach_optimizer(mmcv.Config(dict(optimizer=dict(type="SGD", lr=0.1))))
    for dtype in (torch.float64, torch.float32):
        gen = torch.Generator().manual_seed(0)
        start = [torch.randn(40, 30, generator=gen, dtype=dtype) for _ in range(3)]
        grads = [[torch.randn(40, 30, generator=gen, dtype=dtype) for _ in range(3)] for _ in range(5)]
        final = []
        for foreach in (False, True):
            params = [p.clone().requires_grad_() for p in start]
            opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-2, foreach=foreach)
            for step in grads:
                for p, g in zip(params, step):
                    p.grad = g.clone()
                opt.step()
            final.append(params)
        assert all(torch.equal(a, b) for a, b in zip(*final))


def test_pinned_loader_memory_on_accelerators_only():
    """fbocc-pin-memory: FB-BEV's build_dataloader (pin_memory=False) pins on NPU and CUDA memory, not on CPU
    memory (CPU runs, emulated devices)."""
    pytest.importorskip("torch")
    from bevkit.device import RunDevice, set_run_device
    from bevkit.models.fbocc.patches.speed import _pinned_dataloader, loader_pinning

    assert loader_pinning(RunDevice("npu")) == {"pin_memory": True, "pin_memory_device": "npu"}
    assert loader_pinning(RunDevice("cuda")) == {"pin_memory": True, "pin_memory_device": ""}
    assert loader_pinning(RunDevice("cpu")) == {} == loader_pinning(RunDevice("npu", emulated=True))
    seen = []
    loader = _pinned_dataloader(lambda *args, **kwargs: seen.append(kwargs) or "loader")
    try:
        set_run_device(RunDevice("npu"))
        assert loader("dataset", batch_size=1, pin_memory=False) == "loader"
        set_run_device(RunDevice("npu", emulated=True))
        loader("dataset", pin_memory=False)
    finally:
        set_run_device(None)
    assert seen == [dict(batch_size=1, pin_memory=True, pin_memory_device="npu"), dict(pin_memory=False)]
