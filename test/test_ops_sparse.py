"""bevkit.ops.sparse: spconv.pytorch backed by mx_driving's sparse convolutions where spconv does not import (the
npu profile installs none). With spconv blocked, FB-BEV's modules that import it unconditionally import once the
shim is installed, and the names they get are mx_driving's (the fake, test/fakes/mx_driving, on this machine)."""
from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from bevkit.ops import sparse

FAKES = pathlib.Path(__file__).parent / "fakes"
REPO = pathlib.Path(__file__).resolve().parents[1]


class BlockSpconv(importlib.abc.MetaPathFinder):
    """Makes spconv unimportable, as on a machine without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "spconv" or name.startswith("spconv."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


@pytest.fixture
def no_spconv(monkeypatch):
    for name in [n for n in sys.modules if n == "spconv" or n.startswith("spconv.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BlockSpconv()] + sys.meta_path)
    yield
    for name in [n for n in sys.modules if n == "spconv" or n.startswith("spconv.")]:
        sys.modules.pop(name, None)


@pytest.fixture
def mx(monkeypatch):
    spec = importlib.util.spec_from_file_location("mx_driving", FAKES / "mx_driving" / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setitem(sys.modules, "mx_driving", mod)
    return mod


def _sparse_input(sp, batch=2, shape=(6, 5, 4), n=30, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(batch * shape[0] * shape[1] * shape[2], generator=g)[:n].sort().values
    cols, rest = [], flat
    for w in (shape[0] * shape[1] * shape[2], shape[1] * shape[2], shape[2], 1):
        cols.append(torch.div(rest, w, rounding_mode="floor"))
        rest = rest - cols[-1] * w
    indices = torch.stack(cols, 1).int()
    return sp.SparseConvTensor(torch.randn(n, c, generator=g), indices, list(shape), batch)


def test_shim_names_are_mx_driving_backed(no_spconv, mx):
    with pytest.raises(ModuleNotFoundError):
        import spconv.pytorch  # noqa: F401
    assert sparse.install_spconv_shim() is True
    assert sparse.install_spconv_shim() is True  # idempotent
    import spconv
    import spconv.pytorch as sp
    from spconv.pytorch import functional as Fsp

    assert not hasattr(spconv, "__version__")  # FB-BEV's mmdet3d.ops.spconv keeps seeing no spconv 2
    for name in ("SubMConv3d", "SparseConv3d", "SparseInverseConv3d", "SparseSequential", "SparseModule"):
        assert getattr(sp, name) is getattr(mx, name)
    assert issubclass(sp.SparseConvTensor, mx.SparseConvTensor)
    x = _sparse_input(sp)
    net = sp.SparseSequential(sp.SubMConv3d(4, 8, 3, padding=1, bias=False), torch.nn.BatchNorm1d(8),
                              torch.nn.ReLU())
    y = net(x)
    assert isinstance(y, mx.SparseConvTensor) and torch.equal(y.indices, x.indices)
    assert [name for name, _ in mx.CALLS] == ["SubMConv3d"]
    y.features.sum().backward()
    # sparse_add over one set of sites adds features; over different sites it adds on the union
    z = Fsp.sparse_add(y, y)
    torch.testing.assert_close(z.features, 2 * y.features)
    other = _sparse_input(sp, c=8, seed=1)
    u = Fsp.sparse_add(y, other)
    torch.testing.assert_close(u.dense(), y.dense() + other.dense())
    r = u.replace_feature(u.features * 0 + 1)
    assert isinstance(r, sp.SparseConvTensor) and torch.equal(r.indices, u.indices) and bool((r.features == 1).all())


def test_shim_keeps_a_real_spconv_and_says_what_is_missing(no_spconv, monkeypatch):
    monkeypatch.setitem(sys.modules, "mx_driving", None)  # mx_driving does not import either
    with pytest.raises(ImportError, match="spconv.pytorch.*mx_driving.*setup.sh --profile npu"):
        sparse.install_spconv_shim()
    real = type(sys)("spconv")
    real.__path__ = []
    real.pytorch = type(sys)("spconv.pytorch")
    monkeypatch.setitem(sys.modules, "spconv", real)
    monkeypatch.setitem(sys.modules, "spconv.pytorch", real.pytorch)
    assert sparse.install_spconv_shim() is False and sys.modules["spconv"] is real


CHILD = r'''
import importlib.abc, json, sys
class BlockSpconv(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "spconv" or name.startswith("spconv."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, BlockSpconv())
sys.path.insert(0, FAKES)
import mx_driving  # the fake
if SHIM:
    from bevkit.ops.sparse import install_spconv_shim
    assert install_spconv_shim()
from bevkit.models.fbocc import runtime
try:
    runtime.activate(TRAIN, device="cpu")
    import mmdet3d.models.fbbev.modules.resnet3d as resnet3d
    import mmdet3d.models.fbbev.detectors.fbocc as fbocc
except Exception as exc:
    print("RESULT " + json.dumps(dict(ok=False, error=f"{type(exc).__name__}: {exc}")))
    raise SystemExit(0)
import torch
net = resnet3d.CustomResNet3D(10, block_inplanes=[8, 8, 8, 8], n_input_channels=4, use_spase_3dtensor=True,
                              norm_cfg=dict(type="BN1d", requires_grad=True)).eval()  # deep levels: 1 site
g = torch.Generator().manual_seed(0)
flat = torch.randperm(2 * 8 * 8 * 8, generator=g)[:60].sort().values
idx = torch.stack([flat // 512, flat // 64 % 8, flat // 8 % 8, flat % 8], 1).int()
x = resnet3d.spconv.SparseConvTensor(torch.randn(60, 4, generator=g), idx, [8, 8, 8], 2)
outs = net(x)
sum(o.sum() for o in outs).backward()
print("RESULT " + json.dumps(dict(
    ok=True, names={n: getattr(resnet3d.spconv, n) is getattr(mx_driving, n)
                    for n in ("SubMConv3d", "SparseConv3d", "SparseSequential")},
    fbocc_spconv=fbocc.spconv is resnet3d.spconv, fsp=resnet3d.Fsp.__name__,
    shapes=[list(o.shape) for o in outs], finite=all(bool(torch.isfinite(o).all()) for o in outs),
    ops=sorted({n for n, _ in mx_driving.CALLS}))))
'''


def _child(fbbev, shim: bool, tmp_path):
    code = (CHILD.replace("FAKES", repr(str(FAKES))).replace("SHIM", repr(shim))
            .replace("TRAIN", repr(str(fbbev / "tools" / "train.py"))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fbbev), str(REPO)]), CUDA_VISIBLE_DEVICES="",
               FBBEV_ROOT=str(fbbev))
    env.pop("BEVKIT_EMULATE_DEVICE", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900,
                          cwd=str(tmp_path))
    assert "RESULT " in proc.stdout, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def test_fbbev_imports_spconv_from_the_shim_without_spconv(fbbev_checkout, tmp_path):
    pytest.importorskip("mmcv")
    # the fbocc runtime installs the shim itself where spconv does not import (the npu profile hit this: issue 11)
    without = _child(fbbev_checkout, False, tmp_path)
    assert without["ok"] and without["names"]["SubMConv3d"], without
    res = _child(fbbev_checkout, True, tmp_path)
    assert res["ok"], res
    assert res["names"] == {"SubMConv3d": True, "SparseConv3d": True, "SparseSequential": True}
    assert res["fbocc_spconv"] and res["fsp"] == "spconv.pytorch.functional"
    # FB-BEV's sparse 3-D ResNet (use_spase_3dtensor=True) runs on the mx_driving modules: 8^3 grid, strides 1,2,2,2
    assert res["shapes"] == [[2, 8, 8, 8, 8], [2, 8, 4, 4, 4], [2, 8, 2, 2, 2], [2, 8, 1, 1, 1]]
    assert res["finite"] and {"SubMConv3d", "SparseConv3d"} <= set(res["ops"])
