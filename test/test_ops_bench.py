"""tools/bench_ops.py: its baselines compute the same thing as bevkit.ops (so its speedups compare like with like),
and it prints one JSON document with the agreed keys."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import torch

import bevkit.ops as ops

BENCH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_ops.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ops", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lss_cumsum_baselines_match_bevkit_ops():
    bench = _bench()
    kw = bench.fbocc_bev_pool_inputs(b=1, n=6, d=6, h=4, w=6, c=5)
    assert kw["ranks_bev"].numel() > 50
    args = [kw["depth"].double().requires_grad_(), kw["feat"].double().requires_grad_()]
    ranks = (kw["ranks_depth"], kw["ranks_feat"], kw["ranks_bev"])
    with ops.force_backend("portable"):
        ours = ops.bev_pool_v2(*args, *ranks, kw["shape"], kw["starts"], kw["lengths"])
    base = bench.lss_bev_pool(*args, *ranks, kw["shape"])
    torch.testing.assert_close(ours, base)
    g = torch.randn(ours.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ours, args, g), torch.autograd.grad(base, args, g)):
        torch.testing.assert_close(a, b)

    geom = bench.bevdepth_geom(b=2, n=6, d=8, h=3, w=5)
    feats = torch.randn(*geom.shape[:-1], 4, dtype=torch.float64, requires_grad=True)
    with ops.force_backend("portable"):
        ours = ops.voxel_pooling_train(geom, feats, [128, 128, 1])
    base = bench.lss_voxel_pooling(geom, feats, [128, 128, 1])
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, base)
    g = torch.randn(ours.shape, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(ours, feats, g)[0], torch.autograd.grad(base, feats, g)[0])


def test_bench_prints_one_json_document(capsys):
    _bench().main(["--quick", "--repeat", "1", "--ops", "sigmoid_focal_loss"])
    records = json.loads(capsys.readouterr().out)
    assert {r["pass"] for r in records} == {"fwd", "fwd_bwd"}
    for r in records:
        assert {"op", "pass", "impl", "median_ms", "peak_mb"} <= set(r) and r["median_ms"] > 0
        assert r["peak_mb"] > 0  # the profiler saw the loss tensor being allocated
