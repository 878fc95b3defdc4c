"""Emulated device lanes (issue 11; README "Emulated device lanes"): each model's smoke flow through tools/launch
with ``BEVKIT_EMULATE_DEVICE=<device>`` and ``--device <device>``, 2 gloo processes on CPU tensors, under the
device profile's package set. One run per lane; its per-rank records (test/fakes/sitecustomize.py writes
``emulation/rank<N>.json``) show that the device's own path ran: env file, runtime patch set, optimizer,
loss scaler / autocast / precision plugin, gradient clipping, DDP wrapper, op backends (the fakes' calls).

Cost (slow, CI): FB-OCC trains 6 steps then tools/test.py evaluates 12 val samples, BEVDepth trains 8 steps and
evaluates; all lanes share the synthetic data of test_fbocc_smoke.py (bevkit.data.testing caches it per session).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bevkit import REPO_ROOT, torchcompat

pytestmark = [pytest.mark.slow, pytest.mark.upstream]

#: Where fp16 cannot run on CPU tensors (torch 2.1: the npu profile's torch, the Python 3.8 lane) an emulated
#: device's autocast runs in bfloat16 and the loss scaler passes through (bevkit.emulation, bevkit.torchcompat);
#: the cuda profile installs torch 2.13, so a cuda lane on such a torch stands for no stack the kit sets up.
FP16 = torchcompat.cpu_fp16_amp()
AMP_DTYPE = "float16" if FP16 else "bfloat16"
torch_version = ".".join(map(str, torchcompat.torch_version()))

#: optimizer steps per lane: FB-OCC past its temporal-fusion switch (step 5); BEVDepth's loss scaler skips the first
#: 4 steps (inf gradients while the initial scale of 2**16 comes down to 2**12), then 4 real updates
STEPS = {"fbocc": 6, "bevdepth": 8}
#: the mean loss of the last 2 steps must be at least this much below the first 2 (measured: FB-OCC 6 %, BEVDepth
#: 20 %; both lanes of a model give the same losses to 4 digits)
MIN_LOSS_DROP = 0.02

#: what each lane's device path is made of (the kit's choices, README "Emulated device lanes")
EXPECTED = {
    ("fbocc", "npu"): dict(
        optimizer="torch.optim.adamw.AdamW", fused=None, scaler="torch_npu.GradScaler", max_norm=5.0,
        ddp="mmcv.device.npu.distributed.NPUDistributedDataParallel",
        fakes={"torch_npu": {"set_device", "GradScaler", "autocast"},
               "mx_driving": {"bev_pool_v3", "multi_scale_deformable_attn", "grid_sampler3d_v1"},
               "mmcv_npu": {"sigmoid_focal_loss"}}),
    ("fbocc", "cuda"): dict(
        optimizer="torch.optim.adamw.AdamW", fused=None, scaler="torch.amp.grad_scaler.GradScaler", max_norm=5.0,
        ddp="mmcv.parallel.distributed.MMDistributedDataParallel",
        fakes={"cuda_kernels": {"bev_pool_v2", "multi_scale_deformable_attn", "sigmoid_focal_loss"}}),
    ("bevdepth", "npu"): dict(
        optimizer="torch_npu.optim.NpuFusedAdamW", fused=None, scaler="torch_npu.GradScaler", max_norm=5.0,
        ddp="torch.nn.parallel.distributed.DistributedDataParallel",
        accelerator="bevkit.lightning_npu.NPUAccelerator", strategy="bevkit.lightning_npu.NPUDDPStrategy",
        plugin="bevkit.lightning_npu.NPUMixedPrecisionPlugin",
        fakes={"torch_npu": {"set_device", "GradScaler", "NpuFusedAdamW"}, "mx_driving": {"npu_voxel_pooling_train"}}),
    ("bevdepth", "cuda"): dict(
        optimizer="torch.optim.adamw.AdamW", fused=True, scaler="torch.amp.grad_scaler.GradScaler", max_norm=5.0,
        ddp="torch.nn.parallel.distributed.DistributedDataParallel",
        # Lightning's CUDA accelerator binds a real GPU: the emulated run keeps the CPU one (bevdepth cli.py)
        accelerator="pytorch_lightning.accelerators.cpu.CPUAccelerator",
        strategy="pytorch_lightning.strategies.ddp.DDPStrategy",
        plugin="bevkit.lightning_amp.DeviceMixedPrecisionPlugin",
        fakes={"cuda_kernels": {"voxel_pooling_train", "voxel_pooling_inference"}}),
}
#: imports each lane's package set must refuse on the way (the other device's stack); in a venv without spconv
#: (the emulated npu venv of .ci/py38) there is none to refuse: the import fails as on the device
_SPCONV = {"spconv"} if importlib.util.find_spec("spconv") is not None else set()
REFUSED = {("fbocc", "npu"): _SPCONV, ("bevdepth", "npu"): _SPCONV, ("fbocc", "cuda"): {"torch_npu"},
           ("bevdepth", "cuda"): {"torch_npu"}}


@pytest.fixture
def lane_data(tmp_path_factory, tmp_path):
    """test_fbocc_smoke.py's dataset (generated once per session), hard-linked: each lane prepares its own."""
    from bevkit.data.testing import dataset, hardlink_copy

    source = dataset(tmp_path_factory, image_size=(1600, 900), train_scenes=2, val_scenes=2, samples_per_scene=6)
    return hardlink_copy(source, tmp_path / "nuscenes")


def _expected_patches(model, device):
    from bevkit.device import RunDevice
    from bevkit.patching import load_patch_set

    run = RunDevice(device, emulated=True)
    return {name: [p.name for p in load_patch_set(name).patches if p.applies_to(run)] for name in ("common", model)}


def _losses(results_path: Path, results: dict):
    if "per_step" in results:
        return results["per_step"]["loss"]
    return [json.loads(line)["loss"] for line in (results_path.parent / "steps.jsonl").read_text().splitlines()]


def _check_rank(record, model, device, expected, patches, training):
    where = f"{model}/{device} {record.get('entry')}"
    assert record["device"] == device and record["profile"] == device, where
    assert REFUSED[(model, device)] <= set(record["refused_imports"]), (where, record["refused_imports"])
    if model == "fbocc" and device == "npu":  # FB-BEV's spconv imports get the kit's mx_driving-backed shim
        assert record["spconv"] and "stand-in" in record["spconv"], record["spconv"]
    assert record["patches"] == patches, (where, record["patches"])
    assert record["backend"] == "gloo" and record["ddp"], where
    assert expected["ddp"] in record["ddp"][0]["classes"], (where, record["ddp"])
    for fake, calls in expected["fakes"].items():
        if not training:  # evaluation: no loss scaler, optimizer or losses
            calls = calls - {"GradScaler", "NpuFusedAdamW", "sigmoid_focal_loss"}
        assert calls <= set(record["fakes"].get(fake, {})), (where, fake, record["fakes"])
    other = {"npu": "cuda_kernels", "cuda": "torch_npu"}[device]
    assert other not in record["fakes"], where
    if not training:
        return
    steps = record["steps"]
    assert steps and all(s["optimizer"] == expected["optimizer"] and s["fused"] == expected["fused"]
                         for s in steps), (where, steps[:2])
    assert record["scaler"] and all(s["scaler"] == expected["scaler"] and s["enabled"] == FP16
                                    for s in record["scaler"]), (where, record["scaler"][:2])
    assert any(key.split(":")[1:] == [AMP_DTYPE, "on"] for key in record["autocast"]), (where, record["autocast"])
    # every optimizer step clipped first (also the steps the scaler skipped: their norm is inf/NaN)
    assert len(record["clip"]) == len(record["scaler"]) >= len(steps), where
    assert all(c["max_norm"] == expected["max_norm"] for c in record["clip"]), (where, record["clip"])
    assert any(math.isfinite(c["norm"]) for c in record["clip"]), where
    if "strategy" in expected:
        (trainer,) = record["trainer"]
        assert trainer["accelerator"] == expected["accelerator"], (where, trainer)
        assert trainer["strategy"] == expected["strategy"] and trainer["precision_plugin"] == expected["plugin"], \
            (where, trainer)
        assert trainer["plugin_device"] == device and trainer["gradient_clip_val"] == expected["max_norm"], where
        assert trainer["process_group_backend"] == "gloo" and trainer["scaler"] == expected["scaler"], where


@pytest.mark.parametrize("device", ["npu", pytest.param("cuda", marks=[] if FP16 else [pytest.mark.hardware, pytest.mark.skip(
    reason=f"torch {torch_version} cannot emulate cuda's fp16 AMP on CPU tensors, and the cuda profile installs "
           "torch 2.13: a cuda lane runs with the cuda profile's torch (here: a CUDA GPU)")])])
@pytest.mark.parametrize("model", ["fbocc", "bevdepth"])
def test_emulated_lane(model, device, lane_data, fbbev_checkout, bevdepth_checkout, tmp_path):
    steps = STEPS[model]
    env = dict(os.environ, BEVKIT_EMULATE_DEVICE=device, BEVKIT_PYTHON=sys.executable,
               FBBEV_ROOT=str(fbbev_checkout), BEVDEPTH_SRC=str(bevdepth_checkout),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([str(REPO_ROOT / "tools" / "launch"), "--model", model, "--mode", "smoke",
                           "--device", device, "--nproc", "2", "--data-root", str(lane_data),
                           "--work-dir", str(tmp_path / "runs"), "--max-steps", str(steps)],
                          env=env, capture_output=True, text=True, timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    paths = [Path(line.split("results: ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("results: ")]
    assert len(paths) == (2 if model == "fbocc" else 1), out[-3000:]  # FB-OCC evaluates in tools/test.py
    runs = [json.loads(p.read_text()) for p in paths]
    train, last = runs[0], runs[-1]

    assert train["status"] == "ok" and train["device"] == device and train["world_size"] == 2, train
    assert train["steps"] == steps and train["nonfinite_steps"] == 0
    losses = _losses(paths[0], train)
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    first, final = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert final < first * (1 - MIN_LOSS_DROP), f"loss did not drop by {MIN_LOSS_DROP:.0%}: {losses}"
    assert last["status"] == "ok"
    metrics = last["metrics"]
    assert ("miou" if model == "fbocc" else "nds") in metrics, metrics

    expected, patches = EXPECTED[(model, device)], _expected_patches(model, device)
    for path, run in zip(paths, runs):
        launch = json.loads((path.parent / "launch.json").read_text())
        assert launch["env_files"] == [f"configs/env/{device}.env"] and launch["cann_set_env"] is None, launch
        assert launch["env_set"]["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT / "test" / "fakes")
        records = sorted((path.parent / "emulation").glob("rank*.json"))
        assert [r.name for r in records] == ["rank0.json", "rank1.json"], records
        for record in records:
            _check_rank(json.loads(record.read_text()), model, device, expected, patches,
                        training=run["mode"] == "smoke")
