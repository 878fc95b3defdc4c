"""The one runtime protocol of the models (bevkit.runtime): the device resolved once and never written back,
patches left out by name, the same Activation for both models, activation once per process."""
from __future__ import annotations

import inspect
import os
import sys
import types

import pytest

from bevkit import device, patching
from bevkit.patching import PatchSet, RuntimePatch
from bevkit.runtime import Activation, ModelRuntime


@pytest.fixture
def toy_sets(monkeypatch):
    """Patch sets 'common' and 'toy' over a fake upstream module."""
    mod = types.ModuleType("toy_upstream_mod")
    mod.f = lambda: "upstream f"
    mod.g = lambda: "upstream g"
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    holder = types.ModuleType("toy_patch_sets")
    holder.COMMON = PatchSet("common", [RuntimePatch("c-f", "toy_upstream_mod:f", lambda o: (lambda: "kit f"),
                                                     why="test")])
    holder.TOY = PatchSet("toy", [RuntimePatch("t-g", "toy_upstream_mod:g", lambda o: (lambda: "kit g"), why="test"),
                                  RuntimePatch("t-npu", "toy_upstream_mod:g", lambda o: o, why="test",
                                               devices=("npu",))])
    monkeypatch.setitem(sys.modules, holder.__name__, holder)
    monkeypatch.setitem(patching.PATCH_SETS, "common", "toy_patch_sets:COMMON")
    monkeypatch.setitem(patching.PATCH_SETS, "toy", "toy_patch_sets:TOY")
    yield mod
    device.set_run_device(None)


def test_activation_resolves_the_device_once_and_never_writes_it_back(toy_sets, monkeypatch):
    monkeypatch.delenv("BEVKIT_DEVICE", raising=False)
    seen = []

    class Toy(ModelRuntime):
        def prepare(self, run, entry_file):
            seen.append(("prepare", run.kind, entry_file, device.run_device() is run))

        def finish(self, run):
            seen.append(("finish", run.kind))

    runtime = Toy("toy")
    before = dict(os.environ)
    act = runtime.activate("entry.py", device="cpu")
    assert isinstance(act, Activation) and isinstance(act, dict)
    assert act == {"common": ["c-f"], "toy": ["t-g"]} and act.device.kind == "cpu"
    assert seen == [("prepare", "cpu", "entry.py", True), ("finish", "cpu")]
    assert toy_sets.f() == "kit f" and toy_sets.g() == "kit g"
    assert dict(os.environ) == before  # nothing written back
    assert device.run_device() is act.device  # every hook asks this object
    assert runtime.activate() is act  # once per process
    with pytest.raises(RuntimeError, match="already active for cpu"):
        runtime.activate(device="npu")
    runtime.deactivate()
    assert toy_sets.f() == "upstream f" and toy_sets.g() == "upstream g"


def test_patches_are_left_out_by_name_for_every_model(toy_sets, monkeypatch):
    runtime = ModelRuntime("toy")
    monkeypatch.setenv("BEVKIT_DISABLE_PATCHES", "t-g")
    act = runtime.activate(device="cpu")
    assert act == {"common": ["c-f"], "toy": []} and toy_sets.g() == "upstream g"
    runtime.deactivate()
    assert runtime.activate(device="cpu", disable=["c-f"]) == {"common": [], "toy": ["t-g"]}
    runtime.deactivate()
    with pytest.raises(ValueError, match="unknown toy patches"):
        runtime.activate(device="cpu", disable=["nope"])


def test_both_models_follow_the_protocol():
    from bevkit.models.bevdepth import runtime as bevdepth
    from bevkit.models.fbocc import runtime as fbocc

    for module in (fbocc, bevdepth):
        assert isinstance(module.RUNTIME, ModelRuntime)
        assert list(inspect.signature(module.activate).parameters) == ["entry_file", "device", "disable"]
        assert module.activate.__func__ is ModelRuntime.activate
    import bevkit.models.bevdepth.runtime as bd_module

    assert not hasattr(bd_module, "EXP_ARGV")  # the experiment's argv is its sys.argv, set by run_exp


def test_run_device_precedence_and_helpers(monkeypatch):
    import torch

    monkeypatch.delenv("BEVKIT_EMULATE_DEVICE", raising=False)
    monkeypatch.setenv("BEVKIT_DEVICE", "cpu")
    assert device.RunDevice.resolve().kind == "cpu"
    assert device.RunDevice.resolve("npu").kind == "npu"  # an explicit --device wins
    with pytest.raises(ValueError, match="BEVKIT_DEVICE"):
        device.RunDevice.resolve(environ={"BEVKIT_DEVICE": "tpu"})
    with device.emulate_device("npu"):
        npu = device.RunDevice.resolve(environ={})
        assert npu.kind == "npu" and npu.emulated and npu.memory == "cpu"
        assert npu.torch_device == torch.device("cpu") and npu.dist_backend == "gloo"
        assert npu.cuda_means("cuda:0") == torch.device("cpu") and npu.cuda_means("meta") == "meta"
    assert device.RunDevice("npu").dist_backend == "hccl"
    gpu = device.RunDevice("cuda", local_rank=3)
    assert gpu.dist_backend == "nccl" and gpu.cuda_means("cuda") == torch.device("cuda", 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with device.RunDevice("cpu").autocast_off():
            y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
