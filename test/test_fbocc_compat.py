"""bevkit.compat (patch set 'common'): torchvision on a CPU torch, numpy aliases, mmcv version import guard."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_torchvision_imports_after_shim_in_fresh_process():
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # importing it here could fail: that is the point
        pytest.skip("torchvision is not installed")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from bevkit import compat\n"
            "needed = compat.ensure_torchvision_importable()\n"
            "import torch, torchvision\n"
            "out = torchvision.models.resnet18().eval()(torch.randn(1, 3, 64, 64))\n"
            "print(needed, tuple(out.shape))\n" % str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    needed, shape = proc.stdout.split(maxsplit=1)
    assert shape.strip() == "(1, 1000)"
    assert needed in ("True", "False")


def test_numpy_alias_patch_applies_and_undoes():
    import numpy as np

    from bevkit.compat import PATCHES, prepare_imports

    prepare_imports()  # applying the set imports mmcv (its other patches' targets): not only after other tests did
    had_bool = hasattr(np, "bool") and np.__dict__.get("bool") is not None
    PATCHES.apply("cpu")
    try:
        assert np.int is int and np.float is float and np.bool is bool and np.long is int
        with pytest.raises(AttributeError):
            np.definitely_not_an_attribute  # noqa: B018 - delegation to numpy's own __getattr__
    finally:
        PATCHES.undo()
    if not had_bool:
        with pytest.raises(AttributeError):
            np.float  # noqa: B018


def test_get_stream_patch_converts_indices(monkeypatch):
    from bevkit import compat

    seen = []
    monkeypatch.setenv("BEVKIT_DEVICE", "cuda")
    monkeypatch.setattr(compat, "_torch_at_least", lambda *_: True)
    wrapped = compat._get_stream(lambda device: seen.append(device) or "stream")
    assert wrapped(-1) is None and seen == []
    assert wrapped(3) == "stream"
    assert str(seen[0]) == "cuda:3"


def test_mmcv_version_as_restores(monkeypatch):
    fake = types.ModuleType("mmcv")
    fake.__version__ = "1.7.2"
    monkeypatch.setitem(sys.modules, "mmcv", fake)
    from bevkit.compat import mmcv_version_as

    with mmcv_version_as("1.7.0"):
        assert fake.__version__ == "1.7.0"
    assert fake.__version__ == "1.7.2"


def test_mmcv_fp16_casts_go_to_bf16_only_where_the_cpu_lacks_fp16(monkeypatch):
    """Patch mmcv-fp16-casts-bf16-emulated: only on an emulated device with a torch without fp16 CPU autocast
    (torch 2.1); there auto_fp16 casts float to bfloat16 and force_fp32 casts bfloat16 back, other dtypes kept."""
    import torch

    from bevkit.compat import PATCHES, prepare_imports
    from bevkit.device import RunDevice

    prepare_imports()
    from mmcv.runner import fp16_utils

    (patch,) = [p for p in PATCHES.patches if p.name == "mmcv-fp16-casts-bf16-emulated"]
    npu, cuda = RunDevice("npu", emulated=True), RunDevice("cuda", emulated=True)
    for version, applies in (("2.1.0+cpu", True), ("2.13.0+cpu", False)):
        monkeypatch.setattr(torch, "__version__", version)
        assert patch.applies_to(npu) is applies and patch.applies_to(cuda) is applies
        assert not patch.applies_to(RunDevice("npu")) and not patch.applies_to("cpu")
    patch.resolve()  # the target exists in this mmcv
    cast = patch.build(fp16_utils.cast_tensor_type)
    inputs = {"x": torch.ones(2), "idx": torch.arange(2), "nested": [torch.zeros(1)]}
    lowered = cast(inputs, torch.float, torch.half)
    assert lowered["x"].dtype == lowered["nested"][0].dtype == torch.bfloat16 and lowered["idx"].dtype == torch.int64
    back = cast(lowered, torch.half, torch.float)
    assert back["x"].dtype == back["nested"][0].dtype == torch.float32 and back["idx"].dtype == torch.int64
