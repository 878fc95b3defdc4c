"""BEVDepth against the real upstream (skipped with the reason when no BEVDepth source is available):
the patch applies to a pristine tree, the experiment imports on CPU without CUDA, and the runtime
patches match the upstream formulation in float64 on CPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from bevkit import REPO_ROOT
from tolerance import sum_atol

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.upstream

PINNED = "d78c7b58b10b9ada940462ba83ab24d99cae5833"
EXP_2KEY = "bevdepth.exps.nuscenes.mv.bev_depth_lss_r50_256x704_128x128_24e_2key"


@pytest.fixture(scope="module")
def bd(bevdepth_checkout):
    """The BEVDepth runtime active on CPU in this process (undone afterwards)."""
    pytest.importorskip("mmcv")
    from bevkit.models.bevdepth import runtime

    if str(bevdepth_checkout) not in sys.path:
        sys.path.insert(0, str(bevdepth_checkout))
    runtime.activate(device="cpu")
    yield bevdepth_checkout
    runtime.deactivate()


def test_patch_applies_to_pristine_tree(bevdepth_checkout, tmp_path):
    git_dir = subprocess.run(["git", "-C", str(bevdepth_checkout), "rev-parse", "--git-dir"],
                             capture_output=True, text=True)
    if git_dir.returncode != 0:
        pytest.skip(f"{bevdepth_checkout} is not a git checkout: no pristine tree to apply to")
    tree = tmp_path / "pristine"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(bevdepth_checkout), "archive", PINNED], capture_output=True)
    assert archive.returncode == 0, archive.stderr.decode()
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    patch = REPO_ROOT / "bevdepth" / "bevdepth.patch"
    check = subprocess.run(["git", "apply", "--check", "-v", str(patch)], cwd=tree, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    subprocess.run(["git", "apply", str(patch)], cwd=tree, check=True)
    assert "voxel_pooling_train = None" in (tree / "bevdepth/layers/backbones/base_lss_fpn.py").read_text()


def test_experiment_imports_on_cpu_without_cuda(bevdepth_checkout):
    """A fresh interpreter, CUDA hidden: activate the kit, import the 2key experiment, list the patches."""
    code = (
        "import torch; assert not torch.cuda.is_available()\n"
        "from bevkit.models.bevdepth.runtime import activate\n"
        "activate(device='cpu')\n"
        f"import importlib; m = importlib.import_module('{EXP_2KEY}')\n"
        "from bevkit.models.bevdepth.patches import PATCHES\n"
        "print('classes', m.BEVDepthLightningModel.__mro__[1].__module__)\n"
        "print('applied', ','.join(PATCHES.applied))\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", BEVDEPTH_SRC=str(bevdepth_checkout),
               PYTHONPATH=os.pathsep.join([str(bevdepth_checkout), str(REPO_ROOT)]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(REPO_ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "classes bevdepth.exps.nuscenes.base_exp" in proc.stdout
    applied = proc.stdout.split("applied ", 1)[1].strip().split(",")
    assert {"voxel_pooling_train", "head_targets_device", "training_step_device", "run_cli_kit",
            "depth_gt_precomputed"} <= set(applied)
    assert "get_geometry_mul_sum" not in applied and "head_targets_int32" not in applied  # NPU only


# ------------------------------------------------------------------------------------------ geometry

def _random_mats(batch, cams, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rigid(scale_t):
        angles = torch.rand(3, generator=gen, dtype=dtype) * 6.28
        cx, cy, cz = torch.cos(angles)
        sx, sy, sz = torch.sin(angles)
        rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=dtype)
        ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=dtype)
        rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=dtype)
        m = torch.eye(4, dtype=dtype)
        m[:3, :3] = rz @ ry @ rx
        m[:3, 3] = (torch.rand(3, generator=gen, dtype=dtype) - 0.5) * scale_t
        return m

    sensor2ego = torch.stack([torch.stack([rigid(4.0) for _ in range(cams)]) for _ in range(batch)])
    intrin = torch.zeros(batch, cams, 4, 4, dtype=dtype)
    intrin[..., 0, 0] = intrin[..., 1, 1] = 1266.0
    intrin[..., 0, 2], intrin[..., 1, 2], intrin[..., 2, 2], intrin[..., 3, 3] = 816.0, 491.0, 1.0, 1.0
    ida = torch.eye(4, dtype=dtype).repeat(batch, cams, 1, 1)
    theta = (torch.rand(batch, cams, generator=gen, dtype=dtype) - 0.5) * 0.2
    ida[..., 0, 0], ida[..., 0, 1] = 0.44 * torch.cos(theta), -0.44 * torch.sin(theta)
    ida[..., 1, 0], ida[..., 1, 1] = 0.44 * torch.sin(theta), 0.44 * torch.cos(theta)
    ida[..., 0, 3], ida[..., 1, 3] = -10.0, -140.0
    bda = torch.stack([rigid(0.0) for _ in range(batch)])
    bda[:, :3, :3] *= 1.03
    return sensor2ego, intrin, ida, bda


def _lss_stub(lss_cls, dtype):
    stub = types.SimpleNamespace(final_dim=(256, 704), downsample_factor=16, d_bound=[2.0, 58.0, 0.5])
    stub.frustum = lss_cls.create_frustum(stub).to(dtype)
    return stub


def test_get_geometry_multiply_and_sum_equals_upstream_float64(bd):
    """The port's multiply-and-sum get_geometry against upstream's rank-7 matmuls, float64: three chained 4-term
    sums, whose terms are at most the frustum's pixel x depth products."""
    from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN

    from bevkit.models.bevdepth.patches import get_geometry

    stub = _lss_stub(BaseLSSFPN, torch.float64)
    mats = _random_mats(2, 6, torch.float64)
    expected = BaseLSSFPN.get_geometry(stub, *mats)  # upstream (the multiply-and-sum patch is NPU-only)
    got = get_geometry(stub, *mats)
    assert got.shape == expected.shape == (2, 6, 112, 16, 44, 3)
    terms = float(stub.frustum[..., :2].abs().max() * stub.frustum[..., 2].abs().max())
    tol = 3 * sum_atol(torch.float64, 4, terms)
    assert float((got - expected).abs().max()) <= tol
    no_bda = get_geometry(stub, *mats[:3], None)
    assert float((no_bda - BaseLSSFPN.get_geometry(stub, *mats[:3], None)).abs().max()) <= tol


def test_get_geometry_float32_voxels_match(bd):
    """In float32 the two formulations round differently; the voxel indices they give must still agree."""
    from bevdepth.layers.backbones.base_lss_fpn import BaseLSSFPN

    from bevkit.models.bevdepth.patches import get_geometry

    stub = _lss_stub(BaseLSSFPN, torch.float32)
    mats = _random_mats(2, 6, torch.float32, seed=1)
    size = torch.tensor([0.8, 0.8, 8.0])
    low = torch.tensor([-51.2, -51.2, -5.0])

    def voxels(points):
        return ((points - low) / size).int()

    mismatch = (voxels(get_geometry(stub, *mats)) != voxels(BaseLSSFPN.get_geometry(stub, *mats))).any(-1)
    assert mismatch.float().mean().item() < 1e-4  # boundary cases only


# ------------------------------------------------------------------------------------------ voxel pooling

def _reference_pool(geom, feats, voxel_num):
    """float64 scatter-add: out[b, :, y, x] = sum of features of points inside the grid."""
    nx, ny, nz = [int(v) for v in voxel_num]
    batch = geom.shape[0]
    geom = geom.reshape(batch, -1, 3).long()
    feats = feats.reshape(batch, geom.shape[1], -1).double()
    out = torch.zeros(batch, ny * nx, feats.shape[-1], dtype=torch.float64)
    for b in range(batch):
        x, y, z = geom[b].unbind(-1)
        keep = (x >= 0) & (x < nx) & (y >= 0) & (y < ny) & (z >= 0) & (z < nz)
        out[b].index_add_(0, (y * nx + x)[keep], feats[b][keep])
    return out.reshape(batch, ny, nx, -1).permute(0, 3, 1, 2)


def test_voxel_pooling_through_bevkit_ops(bd):
    pytest.importorskip("bevkit.ops", reason="bevkit.ops not present")
    from bevkit import ops

    if not hasattr(ops, "voxel_pooling_train"):
        pytest.skip("bevkit.ops has no voxel_pooling_train yet")
    from bevdepth.layers.backbones import base_lss_fpn

    gen = torch.Generator().manual_seed(0)
    voxel_num = torch.tensor([16, 12, 1])
    geom = torch.randint(-3, 19, (2, 3, 5, 4, 7, 3), generator=gen, dtype=torch.int32)
    geom[..., 2] = torch.randint(-1, 2, geom.shape[:-1], generator=gen, dtype=torch.int32)
    depth = torch.rand(2 * 3, 5, 4, 7, generator=gen, dtype=torch.float64)
    context = torch.rand(2 * 3, 6, 4, 7, generator=gen, dtype=torch.float64)
    feats = (depth.unsqueeze(1) * context.unsqueeze(2)).reshape(2, 3, 6, 5, 4, 7).permute(0, 1, 3, 4, 5, 2)
    feats = feats.contiguous().requires_grad_(True)
    expected = _reference_pool(geom, feats.detach(), voxel_num)
    out = base_lss_fpn.voxel_pooling_train(geom, feats, voxel_num)  # the patched module attribute
    torch.testing.assert_close(out.double(), expected)
    out.sum().backward()
    # gradient of a sum: 1 for every point inside the grid, 0 outside
    x, y, z = geom.long().unbind(-1)
    inside = ((x >= 0) & (x < 16) & (y >= 0) & (y < 12) & (z >= 0) & (z < 1)).double()
    torch.testing.assert_close(feats.grad, inside.unsqueeze(-1).expand_as(feats))
    infer = base_lss_fpn.voxel_pooling_inference(geom, depth, context, voxel_num)
    torch.testing.assert_close(infer.double(), expected)


# ------------------------------------------------------------------------------------------ head targets

def _tiny_head():
    from bevdepth.layers.heads.bev_depth_head import BEVDepthHead

    from bevdepth.exps.nuscenes import base_exp
    import copy

    conf = copy.deepcopy(base_exp.head_conf)
    conf["bev_backbone_conf"].update(in_channels=16, base_channels=16)
    conf["bev_neck_conf"].update(in_channels=[16, 16, 32, 64], out_channels=[8, 8, 8, 8])
    conf["in_channels"] = 32
    return BEVDepthHead(**conf)


def _reference_targets(head, boxes, labels):
    """The upstream target construction, restated independently (CPU, float64 inputs)."""
    from mmdet3d.core import draw_heatmap_gaussian, gaussian_radius

    cfg = head.train_cfg
    size = cfg["grid_size"][0] // cfg["out_size_factor"]
    result = []
    flag = 0
    for names in head.class_names:
        heat = torch.zeros(len(names), size, size)
        anno = torch.zeros(cfg["max_objs"], 10)
        ind = torch.zeros(cfg["max_objs"], dtype=torch.int64)
        mask = torch.zeros(cfg["max_objs"], dtype=torch.uint8)
        chosen = [i for i in range(len(labels)) if flag <= int(labels[i]) < flag + len(names)]
        # upstream orders a task's boxes by class, then by appearance
        chosen.sort(key=lambda i: int(labels[i]))
        for k, i in enumerate(chosen):
            box = boxes[i]
            w = box[3] / cfg["voxel_size"][0] / cfg["out_size_factor"]
            length = box[4] / cfg["voxel_size"][1] / cfg["out_size_factor"]
            radius = max(cfg["min_radius"], int(gaussian_radius((length, w), min_overlap=cfg["gaussian_overlap"])))
            cx = (box[0] - cfg["point_cloud_range"][0]) / cfg["voxel_size"][0] / cfg["out_size_factor"]
            cy = (box[1] - cfg["point_cloud_range"][1]) / cfg["voxel_size"][1] / cfg["out_size_factor"]
            center = torch.tensor([cx, cy], dtype=torch.float32)
            ci = center.to(torch.int32)
            if not (0 <= ci[0] < size and 0 <= ci[1] < size):
                continue
            draw_heatmap_gaussian(heat[int(labels[i]) - flag], ci, radius)
            ind[k] = ci[1] * size + ci[0]
            mask[k] = 1
            anno[k] = torch.cat([center - ci.float(), box[2:3].float(), box[3:6].float().log(),
                                 torch.sin(box[6:7]).float(), torch.cos(box[6:7]).float(), box[7:9].float()])
        result.append((heat, anno, ind, mask))
        flag += len(names)
    return result


def test_head_targets_on_cpu_equal_upstream_construction(bd):
    head = _tiny_head()
    boxes = torch.tensor([
        [1.0, 2.0, -1.0, 1.9, 4.5, 1.6, 0.3, 1.0, -0.5],     # car
        [-20.0, 15.0, -0.5, 2.5, 8.0, 3.0, -1.0, 0.0, 0.0],  # truck
        [30.0, -30.0, 0.0, 0.6, 0.7, 1.7, 2.0, 0.2, 0.1],    # pedestrian
        [10.0, 10.0, 0.0, 0.4, 0.4, 1.0, 0.0, 0.0, 0.0],     # traffic cone
        [60.0, 0.0, 0.0, 1.9, 4.5, 1.6, 0.0, 0.0, 0.0],      # car outside the grid
        [5.0, -7.0, 0.0, 2.9, 11.0, 3.5, 1.2, 3.0, 0.0],     # bus
    ])
    labels = torch.tensor([0, 1, 8, 9, 0, 3])
    heatmaps, anno_boxes, inds, masks = head.get_targets_single(boxes, labels)  # patched (CPU build)
    expected = _reference_targets(head, boxes, labels)
    assert len(heatmaps) == 6
    for task, (heat, anno, ind, mask) in enumerate(expected):
        torch.testing.assert_close(heatmaps[task], heat)
        torch.testing.assert_close(anno_boxes[task], anno)
        assert torch.equal(inds[task], ind) and inds[task].dtype == torch.int64
        assert torch.equal(masks[task], mask) and masks[task].dtype == torch.uint8
    assert heatmaps[0].max() == 1.0 and masks[0].sum() == 1  # the out-of-grid car is dropped


def test_head_targets_emulated_npu_built_on_host(bd):
    """On NPU the targets are built on the host (tiny ops) and moved to the boxes' device."""
    from bevdepth.layers.heads.bev_depth_head import BEVDepthHead

    from bevkit.models.bevdepth import patches

    seen = []

    def original(self, boxes, labels):
        seen.append((boxes.device.type, labels.device.type))
        return ([boxes.new_zeros((1, 2, 2), device="cuda")], [boxes.new_zeros(3)], [labels.new_zeros(2)],
                [labels.new_zeros(2)])

    fn = patches._get_targets_single(original)
    out = fn(BEVDepthHead.__new__(BEVDepthHead), torch.zeros(2, 9), torch.zeros(2, dtype=torch.long))
    assert seen == [("cpu", "cpu")]
    assert out[0][0].device.type == "cpu"  # the 'cuda' request was mapped to the host


def test_depth_loss_and_head_run_fp32_under_cpu_autocast(bd):
    from bevdepth.exps.nuscenes import base_exp

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with base_exp.autocast(enabled=False):
            y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32
    head = _tiny_head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = head(torch.rand(1, 16, 128, 128))  # the targets' 128 x 128 BEV grid
    assert preds[0][0]["heatmap"].dtype == torch.float32


def test_pretrained_lookup(tmp_path, monkeypatch, bd):
    import hashlib

    from bevkit.models.bevdepth import patches

    monkeypatch.setenv("BEVKIT_CKPT_DIR", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="BEVKIT_CKPT_DIR"):
        patches.find_resnet50()
    bad = tmp_path / patches.RESNET50_FILE
    bad.write_bytes(b"not the weights")
    assert not hashlib.sha256(b"not the weights").hexdigest().startswith("0676ba61")
    with pytest.raises(ValueError, match="sha256"):
        patches.find_resnet50()


# ------------------------------------------------------------------------------------------ depth GT

def test_offline_depth_gt_equals_upstream_online_projection(bd, tmp_path):
    """bevkit.data.depth_gt gives the (u, v, depth) rows upstream's get_lidar_depth computes online, and the
    patched dataset method returns the file's rows."""
    from bevdepth.datasets.nusc_det_dataset import NuscDetDataset
    from PIL import Image

    from bevkit.data.depth_gt import output_path, project_lidar, write_atomic
    from bevkit.models.bevdepth.patches import PATCHES

    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform([-50, -50, -2], [50, 50, 3], size=(20000, 3)),
                             rng.uniform(0, 1, size=(20000, 1))], axis=1).astype(np.float32)
    lidar = {"calibrated_sensor": {"rotation": [0.7071, 0.0, 0.0, 0.7071], "translation": [0.9, 0.0, 1.8]},
             "ego_pose": {"rotation": [0.9, 0.05, 0.02, 0.43], "translation": [400.0, 1100.0, 0.0]}}
    cam = {"filename": "samples/CAM_FRONT/x.jpg",
           "calibrated_sensor": {"rotation": [0.5, -0.5, 0.51, -0.49], "translation": [1.7, 0.01, 1.5],
                                 "camera_intrinsic": [[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]},
           "ego_pose": {"rotation": [0.9, 0.05, 0.021, 0.431], "translation": [400.2, 1100.1, 0.0]}}
    img = Image.new("RGB", (1600, 900))
    assert "depth_gt_precomputed" in PATCHES.applied
    original = NuscDetDataset.get_lidar_depth.__wrapped__  # upstream's online projection
    online = original(types.SimpleNamespace(), points, img, {"LIDAR_TOP": lidar}, cam)
    offline = project_lidar(points, lidar, cam, img.size)
    assert len(online) > 1000
    assert offline.shape == online.shape and offline.dtype == online.dtype == np.float32
    # Both chains compute in float64 (pyquaternion matrices) and round once to float32: one float32 ulp apart
    # at most (they are bit-equal here; another BLAS may round the float64 products differently).
    np.testing.assert_allclose(offline, online, rtol=np.finfo(np.float32).eps, atol=0)
    write_atomic(output_path(tmp_path, cam["filename"]), offline)
    stub = types.SimpleNamespace(data_root=str(tmp_path))
    from_file = NuscDetDataset.get_lidar_depth(stub, points, img, {"LIDAR_TOP": lidar}, cam)
    assert np.array_equal(from_file, offline)
    os.environ["BEVKIT_DEPTH_GT"] = "precomputed"
    try:
        stub.data_root = str(tmp_path / "nothing")
        with pytest.raises(FileNotFoundError, match="bevkit.data.depth_gt"):
            NuscDetDataset.get_lidar_depth(stub, points, img, {"LIDAR_TOP": lidar}, cam)
    finally:
        del os.environ["BEVKIT_DEPTH_GT"]


# ------------------------------------------------------------------------------------------ speed techniques

def test_int32_target_indices_give_the_same_loss(bd):
    """The port's int32 box-centre indices: the head's loss and its gradients are the same as with upstream's
    int64 ones, bit for bit (a gather reads the same rows; float32, the head runs in float32). Where the CPU
    gather takes int64 only (torch 2.1) the patch keeps upstream's int64 indices, and the same holds."""
    from bevkit.models.bevdepth import speed

    index_dtype = torch.int32 if speed.int32_gather_ok(torch.device("cpu")) else torch.int64
    head = _tiny_head()
    boxes = [torch.tensor([[1.0, 2.0, -1.0, 1.9, 4.5, 1.6, 0.3, 1.0, -0.5],
                           [-20.0, 15.0, -0.5, 2.5, 8.0, 3.0, -1.0, 0.0, 0.0],
                           [30.0, -30.0, 0.0, 0.6, 0.7, 1.7, 2.0, 0.2, 0.1]])]
    labels = [torch.tensor([0, 1, 8])]
    targets = head.get_targets(boxes, labels)
    int32 = speed._targets_int32(type(head).get_targets)(head, boxes, labels)
    assert all(i.dtype == index_dtype for i in int32[2]) and all(i.dtype == torch.int64 for i in targets[2])
    assert all(torch.equal(a.long(), b) for a, b in zip(int32[2], targets[2]))
    x = torch.rand(1, 16, 128, 128, generator=torch.Generator().manual_seed(0))  # the targets' BEV grid
    results = []
    for t in (targets, int32):
        loss = head.loss(t, head(x))  # fresh predictions: loss() overwrites their heatmaps in place
        grads = torch.autograd.grad(loss, [p for p in head.parameters() if p.requires_grad], allow_unused=True,
                                    retain_graph=True)
        results.append((loss.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_training_loader_workers(bd, monkeypatch):
    from bevkit.device import RunDevice
    from bevkit.models.bevdepth import speed

    monkeypatch.delenv("BEVKIT_WORKERS", raising=False)
    assert speed.train_workers(RunDevice("npu")) == speed.train_workers(RunDevice("cuda")) == 8
    assert speed.train_workers(RunDevice("cpu")) is None  # upstream's 4
    monkeypatch.setenv("BEVKIT_WORKERS", "2")
    assert speed.train_workers(RunDevice("cpu")) == 2
    monkeypatch.setenv("BEVKIT_WORKERS", "-1")
    with pytest.raises(ValueError, match="BEVKIT_WORKERS=-1"):
        speed.train_workers(RunDevice("cpu"))
    monkeypatch.setenv("BEVKIT_WORKERS", "3")
    collate = lambda batch: batch  # noqa: E731
    upstream = torch.utils.data.DataLoader(list(range(10)), batch_size=4, num_workers=4, drop_last=True,
                                           collate_fn=collate)
    loader = speed._train_dataloader(lambda self: upstream)(None)
    assert loader.num_workers == 3 and loader.batch_size == 4 and loader.drop_last and loader.collate_fn is collate
    assert loader.dataset is upstream.dataset and [len(b) for b in loader] == [4, 4]


@pytest.fixture(scope="module")
def bevdepth_data(root, tmp_path_factory):
    """A hard-linked copy of the synthetic data with BEVDepth's infos and depth_gt/ (the original stays as is)."""
    from bevkit.data.testing import hardlink_copy
    from bevkit.models.bevdepth import prepare

    data = hardlink_copy(root, tmp_path_factory.mktemp("bevdepth-data") / "nuscenes")
    assert prepare.main([str(data), "--workers", "1"]) == 0
    return data


def _without_lidar(data, tmp_path):
    """A copy of ``data`` with every lidar file removed: any attempt to read one fails."""
    from bevkit.data.testing import hardlink_copy

    copy = hardlink_copy(data, tmp_path / "nuscenes")
    lidar = sorted((copy / "samples" / "LIDAR_TOP").glob("*.bin")) + sorted((copy / "sweeps").glob("LIDAR_TOP/*"))
    assert lidar
    for path in lidar:
        path.unlink()  # the other copies keep their own links
    return copy


def test_precomputed_depth_reads_no_lidar_file(bd, bevdepth_data, tmp_path, monkeypatch):
    """With depth_gt/ present no lidar file is opened: every LIDAR_TOP file is deleted, and an audit hook records
    every file the data loading opens. Upstream's get_image (the kit before issue 15) fails on this data."""
    import sys as _sys

    from bevkit.models.bevdepth import bench_data

    data = _without_lidar(bevdepth_data, tmp_path)
    opened = []
    recording = [True]

    def hook(event, args):
        if recording[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    _sys.addaudithook(hook)  # cannot be removed: it stops recording at the end
    try:
        dataset = bench_data.build_dataset(str(data), final_dim=(64, 176))
        monkeypatch.setenv("BEVKIT_DEPTH_GT", "precomputed")
        for i in range(3):
            sample = dataset[i]
        with bench_data.loader_mode("lidar-read"):  # upstream's get_image: reads the deleted sweeps
            with pytest.raises(FileNotFoundError, match="LIDAR_TOP"):
                dataset[0]
    finally:
        recording[0] = False
    lidar_opened = [p for p in opened if "LIDAR_TOP" in p]
    assert lidar_opened and all(p.endswith(".bin") for p in lidar_opened)  # the hook sees the upstream attempt
    assert len(lidar_opened) == 1, lidar_opened  # ... and nothing from the three kit samples
    assert any("/depth_gt/" in p for p in opened)
    depth = sample[-1]
    assert depth.shape[-2:] == (64, 176) and float(depth.max()) > 0  # depth labels came from depth_gt/
    monkeypatch.setenv("BEVKIT_DEPTH_GT", "online")  # online depth needs the lidar: read (and missing here)
    with pytest.raises(FileNotFoundError, match="LIDAR_TOP"):
        dataset[0]


def test_loader_benchmark_prints_every_variant(bd, bevdepth_data, capsys):
    """bench_data in one process: the four loader variants, the draft PSNR and the profile (tiny run)."""
    from bevkit.models.bevdepth import bench_data

    threads = torch.get_num_threads()
    try:
        assert bench_data.main([str(bevdepth_data), "--samples", "1", "--rounds", "1", "--psnr-samples", "1",
                                "--final-dim", "64x176", "--profile"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [re.fullmatch(r"(\S+) +([\d.]+) +([\d.]+) +x[\d.]+", line) for line in out.splitlines()]
    rates = {row[1]: float(row[3]) for row in rows if row}  # the table: mode, wall rate, CPU rate, speed-up
    assert set(rates) == set(bench_data.MODES) and all(r > 0 for r in rates.values()), out
    assert "PSNR" in out and "over 6 images" in out and "kit CPU time by function" in out
    assert out.count("load average") == 2


def test_jpeg_draft_decodes_at_reduced_scale_with_a_small_pixel_change(bd, root):
    """BEVKIT_JPEG_DRAFT's img_transform: same output geometry, decoded at half scale, PSNR above 30 dB against
    the full decode (the benchmark prints the figure at the reference image size)."""
    from bevdepth.datasets import nusc_det_dataset as ds
    from PIL import Image

    from bevkit.data import jpeg
    from bevkit.models.bevdepth.speed import _img_transform_draft

    path = sorted((root / "samples" / "CAM_FRONT").glob("*.jpg"))[0]
    w, h = Image.open(path).size
    resize = 0.45
    dims = (int(w * resize), int(h * resize))
    crop = (10, 5, 10 + dims[0] // 2, 5 + dims[1] // 2)
    transform = getattr(ds.img_transform, "__wrapped__", ds.img_transform)
    ref, ida_ref = transform(Image.open(path), resize, dims, crop, True, 3.0)
    img = Image.open(path)
    got, ida = _img_transform_draft(transform)(img, resize, dims, crop, True, 3.0)
    assert img.size == (-(-w // 2), -(-h // 2))  # decoded at 1/2 scale (>= the 0.45 resize), rounded up
    assert got.size == ref.size and torch.equal(ida, ida_ref)
    a, b = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    assert 0 < mse and 10 * np.log10(255 ** 2 / mse) > 30
    loaded = Image.open(path)
    loaded.load()
    assert jpeg.draft(loaded, dims).size == (w, h)  # an image already decoded is left alone


def test_jpeg_draft_is_opt_in(monkeypatch):
    from bevkit.data import jpeg
    from bevkit.models.bevdepth.patches import PATCHES

    patch = next(p for p in PATCHES.patches if p.name == "jpeg_draft")
    monkeypatch.delenv("BEVKIT_JPEG_DRAFT", raising=False)
    assert not patch.applies_to("cpu") and not jpeg.enabled()
    monkeypatch.setenv("BEVKIT_JPEG_DRAFT", "1")
    assert patch.applies_to("cpu") and patch.applies_to("npu")
    monkeypatch.setenv("BEVKIT_JPEG_DRAFT", "yes")
    with pytest.raises(ValueError, match="BEVKIT_JPEG_DRAFT='yes'"):
        jpeg.enabled()
