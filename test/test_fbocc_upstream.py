"""FB-OCC against the real FB-BEV code (skipped with the reason when no FB-BEV source is available).

The checks that import FB-BEV run in one child process (test/fbocc_checks.py): FB-BEV vendors its own
mmdet3d, which must not share a process with BEVDepth's mmdet3d. Tolerances are float64 unless stated.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerance import sum_atol

REPO = Path(__file__).resolve().parents[1]
PIN = "6e25469256d98e7fcb52cc43efe812dc2fd2b446"

FAST_CHECKS = ["imports", "lidar_coor_rank6", "cam2ego_coor_rank6", "point_sampling_rank6",
               "da_msda_depth_weighting", "focal_loss_op", "occ_loss_nan", "coarse_occ_output", "conv3d_shortcut",
               "model_forward_ops_parity", "resnet_blocks_add_relu", "trilinear_axes", "masked_select_indexing",
               "batch_matmul_view_transform"]


def run_checks(fbbev: Path, names, tmp_path: Path, timeout: int = 900, **extra_env) -> dict:
    out = tmp_path / "checks.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               BEVKIT_DEVICE="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.pop("BEVKIT_EMULATE_DEVICE", None)
    env.update(extra_env)
    proc = subprocess.run([sys.executable, str(REPO / "test" / "fbocc_checks.py"), str(fbbev), str(out), *names],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if not out.is_file():
        pytest.fail(f"fbocc_checks.py produced no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def checks(fbbev_checkout, tmp_path_factory):
    return run_checks(fbbev_checkout, FAST_CHECKS, tmp_path_factory.mktemp("fbocc-checks"))


def facts(checks, name):
    result = checks[name]
    if not result["ok"]:
        pytest.fail(f"{name}: {result['error']}\n{result['traceback']}")
    return result["facts"]


def test_patch_applies_to_pristine_checkout(fbbev_checkout, tmp_path):
    if not (fbbev_checkout / ".git").exists():
        pytest.skip("the FB-BEV checkout has no git metadata to recover the pristine tree from")
    head = subprocess.run(["git", "-C", str(fbbev_checkout), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert head == PIN
    pristine = tmp_path / "pristine"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(fbbev_checkout), str(pristine)], check=True)
    subprocess.run(["git", "-C", str(pristine), "checkout", "-q", PIN], check=True)
    subprocess.run(["git", "-C", str(pristine), "apply", "--check", str(REPO / "fbocc" / "fbocc.patch")], check=True)
    subprocess.run(["git", "-C", str(pristine), "apply", str(REPO / "fbocc" / "fbocc.patch")], check=True)
    diff = subprocess.run(["git", "-C", str(pristine), "diff"], capture_output=True, check=True).stdout
    assert diff == (REPO / "fbocc" / "fbocc.patch").read_bytes()  # byte-identical, CRLF included


def test_upstream_imports_on_cpu_after_activation(checks):
    f = facts(checks, "imports")
    assert f["cuda_available"] is False and f["fbocc_registered"]
    fbocc = set(f["applied"]["fbocc"])
    assert {"fbocc-bev-pool-v2", "fbocc-da-msda", "fbocc-focal-loss-init", "fbocc-model-placement"} <= fbocc
    assert not any(name.endswith("rank6") for name in fbocc), "NPU-only rewrites must not apply on CPU"
    assert not {"fbocc-resnet-add-relu", "fbocc-npu-batch-matmul", "fbocc-masked-select-prepare",
                "fbocc-fpn3d-trilinear-axes", "fbocc-pin-memory", "fbocc-jpeg-draft"} & fbocc  # NPU / CUDA / opt-in


def test_lidar_coor_rank6_parity(checks):
    f = facts(checks, "lidar_coor_rank6")
    assert f["shape"] == [2, 6, 80, 16, 44, 3]
    assert f["max_abs_err_m"] < 1e-9


def test_cam2ego_coor_rank6_parity(checks):
    f = facts(checks, "cam2ego_coor_rank6")
    assert f["inside"] > 1000  # the rig sees the grid: the comparison is not vacuous
    assert f["mismatches"] == 0


def test_point_sampling_rank6_parity(checks):
    f = facts(checks, "point_sampling_rank6")
    assert f["shapes_equal"] and f["visible_anchors"] > 1000
    assert f["max_abs_err"] < 1e-8 and f["mask_mismatches"] == 0  # metres and normalized pixels


def test_da_msda_keeps_depth_weighting(checks):
    f = facts(checks, "da_msda_depth_weighting")
    assert f["max_abs_err"] < 1e-10
    assert f["diff_vs_unweighted"] > 1e-3  # upstream's CPU fallback (no weighting) really differs


def test_focal_loss_through_ops(checks):
    f = facts(checks, "focal_loss_op")
    assert f["rel_err"] < 1e-12 and f["grad_max_abs_err"] < 1e-12


def test_occupancy_loss_clears_nan(checks):
    f = facts(checks, "occ_loss_nan")
    assert f["keys_equal"] and f["finite"] and f["grad_finite"]
    # float32 (upstream's Lovasz term casts to float), the same losses summed in another order: each loss is a
    # mean over n = B*C*X*Y*Z non-negative terms, so the bound of tolerance.py relative to the loss is
    # sum_atol(n, mean term) / loss = 2*lam*sqrt(n)*u. Each gradient element sums over at most the C=19 classes
    # (softmax, one-hot), times its own size. What a wrong NaN/Inf handling does is caught by 'finite' above.
    n = f["n_terms"]
    assert f["max_rel_err"] <= sum_atol(torch.float32, n, 1.0 / n), f
    assert f["grad_max_abs_err"] <= sum_atol(torch.float32, 19, f["grad_max"]), f
    assert f["mask_multiply_keeps_nan"]  # why the NPU port's formulation was wrong


def test_a_head_without_the_deblock_evaluates_on_the_occ3d_grid(checks):
    f = facts(checks, "coarse_occ_output")
    # trained at the coarse grid on upstream's downsampled labels, evaluated at final_occ_size (the grid the
    # evaluator compares), each coarse voxel's logits repeated over its block
    assert f["coarse"] == {"train_shape": [20, 20, 4], "test_shape": [40, 40, 8], "losses_finite": True,
                           "blocks_equal_coarse": True}, f
    # a head coarse in x and y only: its labels are the mode over each voxel's own 2x2x1 block
    assert f["coarse_xy"] == {"train_shape": [20, 20, 8], "test_shape": [40, 40, 8], "losses_finite": True,
                              "blocks_equal_coarse": True, "losses_equal_own_block_mode": True}, f
    # a head one label layer higher (the demo's): labels moved down to its grid, its output moved back up
    assert f["coarse_higher"] == {"train_shape": [20, 20, 4], "test_shape": [40, 40, 8], "losses_finite": True,
                                  "blocks_equal_coarse": True, "losses_equal_own_block_mode": True}, f
    assert "must be point_cloud_range" in f["half_layer_offset"] and "whole label layers" in f["half_layer_offset"]
    # the reference recipe's head (with the deblock) is untouched
    assert f["deblock"] == {"train_shape": [40, 40, 8], "test_shape": [40, 40, 8], "losses_finite": True,
                            "blocks_equal_coarse": True}, f


def test_conv3d_shortcut_rewrite_exact(checks):
    f = facts(checks, "conv3d_shortcut")
    assert f["class"] == "StridedPointwiseConv3d" and f["max_abs_err"] < 1e-12


def test_model_forward_our_ops_equal_reference_ops(checks):
    f = facts(checks, "model_forward_ops_parity")
    # float32, summation order only (the ops reduce in another order than the reference ops). Bound: each of the
    # ~LAYERS reductions on the way to a loss (convs, pooling, attention, the loss means) adds at most the
    # relative error of tolerance.py for its fan-in, FAN_IN = 80 channels x 27 taps of the widest 3-D conv.
    LAYERS, FAN_IN = 30, 80 * 27
    rtol = LAYERS * sum_atol(torch.float32, FAN_IN, 1.0 / FAN_IN)
    assert len(f["losses"]) == 2 and f["max_rel_err"] <= rtol, (rtol, f)


def test_tiny_model_history_and_depth_aware_gradients(checks):
    f = facts(checks, "model_forward_ops_parity")
    assert f["finite"]
    assert f["history_shape"] == [1, 2 * 16, 8, 100, 100]  # 2 history frames x 16 channels, 8x100x100
    # the occupancy losses alone train the depth net (through the LSS pooling and the depth-aware attention)
    assert f["depth_net_grad_from_occ_loss"] > 0 and f["sca_value_proj_grad"] > 0


def test_full_size_model_forward(fbbev_checkout, tmp_path):
    """The 8-card config's model (68.5 M parameters) at full size: one forward_train without backward on one
    synthetic sample (about 15 s and 3.7 GB peak RSS on CPU; forward+backward would be ~66 s and 7.9 GB)."""
    f = run_checks(fbbev_checkout, ["full_size_forward"], tmp_path, timeout=1800)
    res = f["full_size_forward"]
    assert res["ok"], res.get("traceback")
    assert res["facts"]["occ_shape"] == [1, 19, 200, 200, 16]
    assert res["facts"]["finite"]
    assert 60 < res["facts"]["params_M"] < 80


def test_fake_npu_step(fbbev_checkout, tmp_path):
    """NPU code path on CPU: activation and a training step on the emulated device with the fake mx_driving
    (checks each op's documented contract) and only what the npu profile installs (the lanes' package set,
    test/fakes/sitecustomize.py): no spconv, which FB-BEV imports unconditionally. Before the spconv shim was wired
    into the activation it failed: PatchTargetMissing: runtime patch 'fbocc-sync-bn-policy': cannot import module
    'mmdet3d.models' (ModuleNotFoundError: No module named 'spconv' on the npu profile ...)."""
    fakes = REPO / "test" / "fakes"
    res = run_checks(fbbev_checkout, ["fake_npu_step"], tmp_path, BEVKIT_EMULATE_DEVICE="npu", BEVKIT_DEVICE="npu",
                     PYTHONPATH=os.pathsep.join([str(fakes), str(REPO)]))["fake_npu_step"]
    assert res["ok"], res.get("traceback")
    f = res["facts"]
    assert f["profile"] == "npu"
    if f["spconv_on_path"]:  # the cpu venv's spconv is out of reach (the emulated npu venv has none at all)
        assert "spconv" in f["spconv_refused"]
    assert f["spconv_shim"] and f["finite"]  # FB-BEV's spconv.pytorch imports are mx_driving's sparse modules
    assert {"fbocc-lidar-coor-rank6", "fbocc-point-sampling-rank6", "fbocc-conv3d-shortcut-stride"} <= \
        set(f["applied"]["fbocc"])
    assert f["strided_convs"] == 2  # the two stride-2 shortcut convs of the 3-D ResNet
    assert {"bev_pool_v3", "multi_scale_deformable_attn", "grid_sampler3d_v1"} <= set(f["ops_called"]), f
    # the DrivingSDK port's speed techniques, applied on the (emulated) NPU
    speed = {"fbocc-npu-batch-matmul", "fbocc-resnet-add-relu", "fbocc-resnet-stem-maxpool", "fbocc-resnet3d-add-relu",
             "fbocc-fpn3d-trilinear-axes", "fbocc-occ-head-trilinear-axes", "fbocc-pin-memory"}
    assert speed <= set(f["applied"]["fbocc"]), f["applied"]  # the masked-select ones depend on torch: below
    assert "fbocc-jpeg-draft" not in f["applied"]["fbocc"]  # opt-in
    assert {"npu_add_relu", "npu_batch_matmul"} <= set(f["train_ops"]), f
    assert "npu_max_pool2d" not in f["train_ops"] and "npu_max_pool2d" in f["ops_called"]  # no backward: eval only
    assert f["stem_pool"] == "StemMaxPool2d"
    assert f["add_relu_calls"] >= 8 + 8  # ResNet-18 (8 blocks) forward + 3-D blocks; the eval forward adds 8
    assert f["counts"]["trilinear_reversed"] >= 2, f["counts"]
    if f["modes_see_indexing"]:  # torch 2.13
        assert f["counts"]["masked_select"] >= 3
        assert {"fbocc-masked-select-prepare", "fbocc-masked-select-depth-loss"} <= set(f["applied"]["fbocc"])
    else:  # torch 2.1: the patches would change nothing, so they are off (and the log says so)
        assert f["counts"]["masked_select"] == 0 and "fbocc-masked-select-prepare" not in f["applied"]["fbocc"]


def test_resnet_blocks_with_fused_add_relu_are_upstreams(checks):
    f = facts(checks, "resnet_blocks_add_relu")
    assert len(f["cases"]) == 6 and f["stem_pool_equal"]
    assert f["max_abs_err"] == 0.0, f  # relu(x + y) in both: the same two roundings, values and gradients


def test_trilinear_on_reversed_axes(checks):
    f = facts(checks, "trilinear_axes")
    for name, r in f.items():
        # float64, each output a sum of 8 weighted taps summed in another order (weights >= 0, summing to 1);
        # each input gradient a sum of at most 8 * ratio^3 weighted output gradients.
        assert r["max_abs_err"] <= sum_atol(torch.float64, 8, r["x_max"]), (name, r)
        assert r["grad_max_abs_err"] <= sum_atol(torch.float64, r["grad_terms"], r["grad_out_max"]), (name, r)
        assert r["routed_equal"] and r["scale_factor_not_routed"], (name, r)


def test_masked_select_indexing_is_bit_identical(checks):
    f = facts(checks, "masked_select_indexing")
    assert f["prepare_equal"] and 0 < f["kept"] < f["points"]  # some points outside the grid: a real selection
    if f["modes_see_indexing"]:  # torch 2.1 never routes indexing through the mode (the patches are off there)
        assert f["masked_select_dims"] == [1, 2] and f["calls"] >= 5  # 1-D ranks and 2-D coordinate rows, depth loss
    assert f["depth_loss_equal"] and f["depth_grad_equal"] and f["depth_loss"] > 0


def test_batch_matmul_as_multiply_and_sum(checks):
    f = facts(checks, "batch_matmul_view_transform")
    # float64; three chained 3-term sums. get_lidar_coor: terms at most the frustum's pixel x depth products.
    # point_sampling: relative to each output's largest value (the perspective divide by max(z, 1e-5) makes
    # the absolute values of points behind the cameras huge).
    assert f["lidar_max_abs_err_m"] <= 3 * sum_atol(torch.float64, 3, f["term_magnitude"]), f
    assert max(f["point_sampling_rel_err"]) <= 3 * sum_atol(torch.float64, 3, 1.0), f
    assert f["mask_mismatches"] == 0
