"""The NPU Lightning pieces (bevkit.lightning_npu, the kit CLI's NPU setup, NPU-only patches) against a
fake torch_npu (test/fakes/torch_npu): no Ascend hardware, no upstream needed."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from bevkit.compat import prepare_imports  # noqa: E402

prepare_imports()
pl = pytest.importorskip("pytorch_lightning")

FAKES = Path(__file__).resolve().parent / "fakes"


def test_accelerator_devices(fake_npu, monkeypatch):
    from bevkit.lightning_npu import NPUAccelerator

    monkeypatch.setenv("FAKE_NPU_COUNT", "8")
    assert NPUAccelerator.is_available()
    assert NPUAccelerator.auto_device_count() == 8
    assert NPUAccelerator.parse_devices(8) == list(range(8))
    assert NPUAccelerator.parse_devices("0,3") == [0, 3]
    assert NPUAccelerator.parse_devices(-1) == list(range(8))
    assert NPUAccelerator.get_parallel_devices([0, 3]) == [torch.device("npu", 0), torch.device("npu", 3)]
    with pytest.raises(ValueError, match="9 NPUs"):
        NPUAccelerator.parse_devices(9)
    NPUAccelerator().setup_device(torch.device("npu", 3))
    assert ("set_device", torch.device("npu", 3)) in fake_npu.CALLS
    with pytest.raises(ValueError, match="npu"):
        NPUAccelerator().setup_device(torch.device("cpu"))


def test_registered_by_name():
    from pytorch_lightning.accelerators import AcceleratorRegistry
    from pytorch_lightning.strategies import StrategyRegistry

    import bevkit.lightning_npu as npu_mod

    assert AcceleratorRegistry.get("npu").__class__ is npu_mod.NPUAccelerator
    assert StrategyRegistry["ddp_npu"]["strategy"] is npu_mod.NPUDDPStrategy


def _cli_args(**over):
    base = dict(devices=None, gpus=None, num_nodes=None, precision=None)
    base.update(over)
    return argparse.Namespace(**base)


def test_trainer_on_8_fake_npus_uses_hccl_and_npu_amp(fake_npu, monkeypatch):
    from bevkit.lightning_npu import NPUAccelerator, NPUDDPStrategy, NPUMixedPrecisionPlugin
    from bevkit.models.bevdepth.cli import trainer_setup, world_size_of

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    kwargs = trainer_setup("npu", _cli_args())
    assert world_size_of(kwargs) == 8
    assert isinstance(kwargs["accelerator"], NPUAccelerator)
    assert isinstance(kwargs["strategy"], NPUDDPStrategy)
    assert [type(p) for p in kwargs["plugins"]] == [NPUMixedPrecisionPlugin]
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs)
    strategy = trainer.strategy
    assert strategy._get_process_group_backend() == "hccl"
    assert strategy.parallel_devices == [torch.device("npu", i) for i in range(8)]
    assert strategy.root_device == torch.device("npu", 0)
    assert strategy.determine_ddp_device_ids() == [0]
    precision = trainer.precision_plugin
    assert isinstance(precision, NPUMixedPrecisionPlugin)
    assert precision.device == "npu" and precision.precision == "16"
    assert isinstance(precision.scaler, fake_npu.GradScaler)


def test_nodes_and_devices_from_torchrun(fake_npu, monkeypatch):
    from bevkit.models.bevdepth.cli import trainer_setup, world_size_of

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "16")
    kwargs = trainer_setup("npu", _cli_args(num_nodes=1))
    assert kwargs["num_nodes"] == 2 and kwargs["devices"] == 8 and world_size_of(kwargs) == 16
    assert trainer_setup("cpu", _cli_args(num_nodes=4))["num_nodes"] == 4  # an explicit --num_nodes wins


def test_npu_autocast_device_type(fake_npu, monkeypatch):
    from bevkit.lightning_npu import NPUMixedPrecisionPlugin

    seen = []

    class Recorder:
        def __init__(self, device_type, *args, **kwargs):
            seen.append((device_type, kwargs.get("dtype")))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", Recorder)
    with NPUMixedPrecisionPlugin().forward_context():
        pass
    assert seen == [("npu", torch.half)]
    seen.clear()
    plugin = NPUMixedPrecisionPlugin("bf16")
    assert plugin.scaler is None
    with plugin.forward_context():
        pass
    assert seen == [("npu", torch.bfloat16)]


def test_single_npu_and_cpu_cuda_setups(fake_npu, monkeypatch):
    from pytorch_lightning.strategies import DDPStrategy

    from bevkit.lightning_npu import SingleNPUStrategy
    from bevkit.models.bevdepth.cli import trainer_setup

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = trainer_setup("npu", _cli_args())
    assert isinstance(single["strategy"], SingleNPUStrategy)
    assert single["strategy"].root_device == torch.device("npu", 0)
    cpu = trainer_setup("cpu", _cli_args(devices=2))
    assert cpu["accelerator"] == "cpu" and cpu["precision"] == 32
    assert isinstance(cpu["strategy"], DDPStrategy) and cpu["strategy"].process_group_backend == "gloo"
    with pytest.warns(UserWarning, match="bf16"):
        assert trainer_setup("cpu", _cli_args(precision="16"))["precision"] == "bf16"
    cuda = trainer_setup("cuda", _cli_args(devices=8))
    assert cuda["accelerator"] == "gpu" and cuda["precision"] == 32  # fp16 AMP is the kit's plugin
    (amp,) = cuda["plugins"]
    assert type(amp).__name__ == "DeviceMixedPrecisionPlugin" and amp.device == "cuda" and amp.precision == "16"
    assert cuda["strategy"].process_group_backend == "nccl"


def test_voxel_pooling_is_decided_by_bevkit_ops_even_on_cuda(monkeypatch):
    """The runtime patch never calls BEVDepth's compiled kernel itself: bevkit.ops dispatch decides, so
    BEVKIT_OPS_BACKEND=portable is honoured on CUDA tensors too (emulated here)."""
    from bevkit.device import emulate_device
    from bevkit.models.bevdepth import patches

    def compiled(*args):
        raise AssertionError("the upstream kernel was called around bevkit.ops")

    train = patches._voxel_pooling_train(compiled)
    infer = patches._voxel_pooling_inference(compiled)
    geom = torch.zeros(1, 2, 3, dtype=torch.int32)
    geom[0, 1] = torch.tensor([1, 0, 0], dtype=torch.int32)
    feats = torch.ones(1, 2, 4)
    monkeypatch.setenv("BEVKIT_OPS_BACKEND", "portable")
    with emulate_device("cuda"):
        out = train(geom, feats, [2, 1, 1])
        pooled = infer(geom.view(1, 1, 2, 1, 1, 3), torch.ones(1, 2, 1, 1), torch.ones(1, 4, 1, 1), [2, 1, 1])
    assert out.shape == (1, 4, 1, 2) and out.sum() == 8
    assert pooled.shape == (1, 4, 1, 2) and pooled.sum() == 8


def test_optimizer_per_device(fake_npu):
    from bevkit.models.bevdepth.patches import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    npu_opt = make_optimizer(params, 2e-4, 1e-7, "npu")
    assert isinstance(npu_opt, fake_npu.NpuFusedAdamW)
    assert ("NpuFusedAdamW", {"lr": 2e-4, "weight_decay": 1e-7}) in fake_npu.CALLS
    cpu_opt = make_optimizer(params, 2e-4, 1e-7, "cpu")
    assert type(cpu_opt) is torch.optim.AdamW and cpu_opt.defaults["foreach"] is True
    assert cpu_opt.defaults["weight_decay"] == 1e-7


NPU_STEP = r'''
import json, sys
sys.path.insert(0, FAKES)
import mx_driving, torch_npu  # the fakes
assert mx_driving.__version__ == "0.0.fake" and torch_npu.FAKE
from bevkit.device import emulate_device
from bevkit.models.bevdepth.runtime import activate
with emulate_device("npu"):
    activate(device="npu")
    import runpy, torch
    from bevkit.models.bevdepth.patches import PATCHES
    tiny = runpy.run_path(TINY, run_name="tiny")
    model = tiny["BEVDepthLightningModel"](data_root="unused", default_root_dir=OUT, gpus=8,
                                           batch_size_per_device=1)
    import bevdepth.layers.backbones.base_lss_fpn as lss
    geometry_is_ours = lss.BaseLSSFPN.get_geometry.__module__ == "bevkit.models.bevdepth.speed"
    b, n = 1, 6
    h, w = tiny["FINAL_DIM"]
    imgs = torch.rand(b, 2, n, 3, h, w)
    eye = torch.eye(4).repeat(b, 2, n, 1, 1)
    intrin = eye.clone(); intrin[..., 0, 0] = intrin[..., 1, 1] = 100.0; intrin[..., 0, 2] = w / 2; intrin[..., 1, 2] = h / 2
    mats = dict(sensor2ego_mats=eye.clone(), intrin_mats=intrin, ida_mats=eye.clone(),
                sensor2sensor_mats=eye.clone(), bda_mat=torch.eye(4).repeat(b, 1, 1))
    boxes = [torch.tensor([[10.0, 2.0, 0.0, 1.9, 4.5, 1.6, 0.3, 0.0, 0.0]])]
    labels = [torch.tensor([0])]
    depth = torch.zeros(b, 1, n, h, w); depth[..., 10:20, 30:40] = 12.0
    model.train()
    loss = model.training_step((imgs, mats, None, None, boxes, labels, depth))
    loss.backward()
    inds = model.model.get_targets(boxes, labels)[2]
    from bevkit.models.bevdepth.speed import train_workers
    [[opt], [sched]] = model.configure_optimizers()
    opt.step()
    print("RESULT " + json.dumps(dict(
        loss=float(loss), applied=PATCHES.applied, geometry_is_ours=geometry_is_ours,
        optimizer=type(opt).__module__ + "." + type(opt).__name__, weight_decay=opt.defaults["weight_decay"],
        lr=opt.defaults["lr"], voxel_calls=mx_driving.calls("npu_voxel_pooling_train"),
        internal_format=torch.npu.config.allow_internal_format, inds_dtypes=sorted({str(i.dtype) for i in inds}),
        workers=train_workers())))
'''


@pytest.mark.upstream
def test_tiny_training_step_on_fake_npu(bevdepth_checkout, tmp_path):
    """A training step of the tiny variant with NPU patches, NPU tensors emulated on the CPU: voxel pooling
    reaches mx_driving within its documented contract, the optimizer is torch_npu's fused AdamW with
    upstream's hyperparameters, the loss is finite; the speed techniques are applied (multiply-and-sum geometry,
    int32 target indices, 8 loader workers, no lidar reading), the opt-in JPEG draft is not."""
    import json
    import os
    import subprocess

    from bevkit import REPO_ROOT

    pytest.importorskip("mmcv")
    code = NPU_STEP.replace("FAKES", repr(str(FAKES))).replace("TINY", repr(
        str(REPO_ROOT / "bevdepth/configs/bev_depth_tiny_smoke.py"))).replace("OUT", repr(str(tmp_path)))
    env = dict(os.environ, BEVDEPTH_SRC=str(bevdepth_checkout), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(bevdepth_checkout), str(REPO_ROOT)]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["loss"] == result["loss"] and abs(result["loss"]) < 1e6
    assert {"get_geometry_mul_sum", "dcn_portable", "voxel_num_device", "head_targets_device", "head_targets_int32",
            "train_loader_workers", "no_lidar_read"} <= set(result["applied"])
    assert "jpeg_draft" not in result["applied"]  # opt-in
    assert result["geometry_is_ours"]
    try:  # the port's int32 indices where the emulating CPU gathers int32 (torch >= 2.2; 2.1 takes only int64)
        torch.zeros(2).gather(0, torch.zeros(1, dtype=torch.int32))
        expected = "torch.int32"
    except RuntimeError:
        expected = "torch.int64"
    assert result["inds_dtypes"] == [expected]
    assert result["workers"] == 8
    assert result["optimizer"].endswith("NpuFusedAdamW") and result["weight_decay"] == 1e-7
    assert result["lr"] == pytest.approx(2.5e-4 * 1 * 8)  # tiny variant's lr per image x batch x world size
    calls = result["voxel_calls"]
    assert len(calls) == 2  # key frame + previous key frame
    assert all(c["B"] == 1 and c["N"] == 6 * 14 * 4 * 12 and c["C"] == 16 and c["voxel_num"] == [32, 32, 1]
               for c in calls)
    assert result["internal_format"] is False
