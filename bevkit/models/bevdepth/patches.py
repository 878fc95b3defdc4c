"""Runtime patches that make BEVDepth (Megvii-BaseDetection/BEVDepth @d78c7b5) run on NPU, CUDA and CPU.

Every change to upstream behaviour lives here as a named :class:`~bevkit.patching.RuntimePatch`
(``python -m bevkit.patching list bevdepth`` prints them); ``bevdepth/bevdepth.patch`` only makes the
checkout build and import without CUDA. Patches wrap the upstream function where possible, so the
upstream code still does the work; the few replacements (``get_geometry``) are parity-tested against
the upstream formulation in ``test/test_bevdepth_patches.py``. The speed techniques live in
:mod:`bevkit.models.bevdepth.speed` (``get_geometry`` is imported from there).
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

from bevkit import checkpoints, env
from bevkit.data.decode import checked_image, naming_sample
from bevkit.device import device_type, run_device
from bevkit.models.bevdepth.pictures import dump_on_eval_step
from bevkit.models.bevdepth.results import record_on_evaluate
from bevkit.data import jpeg
from bevkit.models.bevdepth.speed import (_get_image, _get_lidar_depth, _img_transform_draft, _numpy_for_dataset,
                                          _targets_int32, _train_dataloader, get_geometry)
from bevkit.patching import PatchSet, RuntimePatch

LSS = "bevdepth.layers.backbones.base_lss_fpn"
HEAD = "bevdepth.layers.heads.bev_depth_head"
EXP = "bevdepth.exps.nuscenes.base_exp"
DATASET = "bevdepth.datasets.nusc_det_dataset"
EVALUATOR = "bevdepth.evaluators.det_evaluators"


# ---------------------------------------------------------------------------------------------------
# helpers


class StaysPut(torch.Tensor):
    """A tensor whose ``.cuda()`` returns itself (as a plain tensor) on whatever device it is on.

    Upstream calls ``.cuda()`` on tensors that Lightning (or the module's buffers) already placed on
    the right device; this makes those calls no-ops on NPU and CPU without editing the upstream.
    """

    def cuda(self, *args, **kwargs):  # noqa: D102 - see class doc
        return self.as_subclass(torch.Tensor)


def stays_put(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(StaysPut)


def _cuda_autocast_replacement(original):
    """``autocast(enabled=False)`` -> autocast off on the run's device (RunDevice.autocast_off); anything else
    stays upstream's."""

    def autocast(enabled: bool = True, *args, **kwargs):
        if not enabled and not args and not kwargs:
            return run_device().autocast_off()
        return original(enabled, *args, **kwargs)

    return autocast


class _MapCudaDevice(TorchFunctionMode):
    """Turn ``device='cuda'`` arguments into ``device=target`` (upstream hard-codes 'cuda')."""

    def __init__(self, target: torch.device):
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and str(dev).startswith("cuda"):
            kwargs = dict(kwargs, device=self.target)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# ops


def _voxel_pooling_train(original):
    """bevkit.ops decides the backend (upstream's compiled kernel on CUDA when built, mx_driving on NPU,
    portable elsewhere; BEVKIT_OPS_BACKEND forces one)."""

    def voxel_pooling_train(geom_xyz, input_features, voxel_num):
        from bevkit import ops

        return ops.voxel_pooling_train(geom_xyz, input_features, voxel_num)

    voxel_pooling_train.__bevkit_original__ = original
    return voxel_pooling_train


def _voxel_pooling_inference(original):
    def voxel_pooling_inference(geom_xyz, depth_features, context_features, voxel_num):
        from bevkit import ops

        return ops.voxel_pooling_inference(geom_xyz, depth_features, context_features, voxel_num)

    voxel_pooling_inference.__bevkit_original__ = original
    return voxel_pooling_inference


def _forward_single_sweep(original):
    @functools.wraps(original)
    def _forward_single_sweep(self, *args, **kwargs):
        buffer = self._buffers["voxel_num"]
        self._buffers["voxel_num"] = stays_put(buffer)  # upstream: self.voxel_num.cuda()
        try:
            return original(self, *args, **kwargs)
        finally:
            self._buffers["voxel_num"] = buffer

    return _forward_single_sweep


def _deform_conv_forward(original):
    """DepthNet's DCN through bevkit.ops.deform_conv2d (mx_driving.deform_conv2d on NPU, see bevkit.ops)."""

    @functools.wraps(original)
    def forward(self, x):
        from bevkit import ops

        offset = self.conv_offset(x)
        return ops.deform_conv2d(x, offset, self.weight, self.stride, self.padding, self.dilation,
                                 self.groups, self.deform_groups, False, self.im2col_step)

    return forward


# ---------------------------------------------------------------------------------------------------
# head


def _get_targets_single(original):
    @functools.wraps(original)
    def get_targets_single(self, gt_bboxes_3d, gt_labels_3d):
        home = gt_bboxes_3d.device
        cpu = torch.device("cpu")
        # Build on the host: hundreds of tiny per-object ops are launch-bound on an accelerator.
        with _MapCudaDevice(cpu):
            targets = original(self, gt_bboxes_3d.to(cpu), gt_labels_3d.to(cpu))
        if home.type == "cpu":
            return targets
        return tuple([t.to(home, non_blocking=True) for t in group] for group in targets)

    return get_targets_single


def _head_forward(original):
    inner = getattr(original, "__wrapped__", original)  # under upstream's cuda-only autocast(False)

    @functools.wraps(inner)
    def forward(self, x):
        with run_device().autocast_off():
            return inner(self, x)

    return forward


# ---------------------------------------------------------------------------------------------------
# Lightning module


def _training_step(original):
    @functools.wraps(original)
    def training_step(self, batch, *args, **kwargs):
        batch = list(batch)
        batch[-1] = stays_put(batch[-1])  # upstream: depth_labels.cuda(), unconditionally
        return original(self, tuple(batch))

    return training_step


def make_optimizer(params, lr: float, weight_decay: float, kind: str):
    """AdamW for the device: torch_npu's fused kernel on NPU, fused on CUDA, foreach on CPU."""
    if kind == "npu":
        from torch_npu.optim import NpuFusedAdamW

        return NpuFusedAdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def _configure_optimizers(original):
    @functools.wraps(original)
    def configure_optimizers(self):
        (optimizer,), (scheduler,) = original(self)
        group = optimizer.param_groups[0]
        weight_decay = getattr(self, "hparams", {}).get("weight_decay")
        if weight_decay is None:
            weight_decay = group["weight_decay"]  # upstream: 1e-7
        kind = device_type(group["params"][0])
        new = make_optimizer(group["params"], group["lr"], weight_decay, kind)
        milestones = sorted(scheduler.milestones.elements())
        new_scheduler = torch.optim.lr_scheduler.MultiStepLR(new, milestones, gamma=scheduler.gamma)
        return [[new], [new_scheduler]]

    return configure_optimizers


#: The data root of the Lightning module being built (its backbone looks for pretrained weights there).
_building = threading.local()


def _module_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        _building.data_root = kwargs.get("data_root")
        try:
            original(self, *args, **kwargs)
        finally:
            _building.data_root = None
        # upstream's evaluator reads './data/nuScenes' whatever --data_root says
        self.evaluator.data_root = self.data_root
        self.evaluator.version = kwargs.get("nusc_version") or env.get("BEVKIT_NUSC_VERSION") or \
            self.evaluator.version

    return __init__


# ---------------------------------------------------------------------------------------------------
# pretrained backbone

RESNET50_FILE = checkpoints.RESNET50.file


def find_resnet50(data_root: Optional[str] = None) -> Path:
    """The verified local torchvision ResNet-50 (bevkit.checkpoints search order), or a FileNotFoundError
    saying where to put it."""
    return checkpoints.locate(checkpoints.RESNET50, data_root,
                              fallback="or set BEVKIT_PRETRAINED=none to train from scratch")


def _lss_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        conf = kwargs.get("img_backbone_conf")
        if conf is not None and isinstance(conf.get("init_cfg"), dict) \
                and conf["init_cfg"].get("checkpoint") == "torchvision://resnet50":
            conf = dict(conf)
            if (env.get("BEVKIT_PRETRAINED") or "").lower() == "none":
                conf.pop("init_cfg")
            else:
                path = find_resnet50(getattr(_building, "data_root", None) or env.get("BEVKIT_DATA_ROOT"))
                conf["init_cfg"] = dict(conf["init_cfg"], checkpoint=str(path))
            kwargs["img_backbone_conf"] = conf
        original(self, *args, **kwargs)

    return __init__


def _is_function(original: Any) -> bool:
    return callable(original)


def _sample_token(dataset, idx):
    return dataset.infos[dataset.sample_indices[idx] if dataset.use_cbgs else idx]["sample_token"]


def _lightning_load(original):
    """Lightning's checkpoint IO (fit/test ``ckpt_path``) through the kit's weights_only loader."""
    from bevkit.torch_load import load

    def pl_load(path_or_url, map_location=None):
        if isinstance(path_or_url, (str, Path)) and not str(path_or_url).startswith(("http://", "https://")):
            return load(path_or_url, map_location=map_location)
        return original(path_or_url, map_location=map_location)

    pl_load.__bevkit_original__ = original
    return pl_load


def _kit_run_cli(original):
    from .cli import run_cli

    return run_cli


PATCHES = PatchSet("bevdepth", [
    RuntimePatch(
        "run_cli_kit", "bevdepth.exps.base_cli:run_cli", _kit_run_cli,
        why="upstream's CLI targets Lightning 1.6 on CUDA (accelerator='ddp', --gpus); the kit's picks "
            "accelerator, DDP backend and precision per device on Lightning 1.9 (same arguments)"),
    RuntimePatch(
        "voxel_pooling_train", f"{LSS}:voxel_pooling_train", _voxel_pooling_train,
        why="the compiled op exists only with CUDA and is called before any backend choice; bevkit.ops picks "
            "it on CUDA, mx_driving on NPU, portable PyTorch elsewhere (BEVKIT_OPS_BACKEND forces one)"),
    RuntimePatch(
        "voxel_pooling_inference", f"{LSS}:voxel_pooling_inference", _voxel_pooling_inference,
        why="as voxel_pooling_train, for evaluation"),
    RuntimePatch(
        "voxel_num_device", f"{LSS}:BaseLSSFPN._forward_single_sweep", _forward_single_sweep,
        why="upstream passes self.voxel_num.cuda(); the buffer is already on the module's device",
        devices=("npu", "cpu"), on="memory", check=_is_function),
    RuntimePatch(
        "get_geometry_mul_sum", f"{LSS}:BaseLSSFPN.get_geometry", lambda original: get_geometry,
        why="rank-7 broadcast matmuls exceed the NPU's rank-6 matmul; the same maths as elementwise multiply-and-"
            "sum on [B, N, D*H*W, 4] rows (the DrivingSDK port's rewrite, credited +20 %)",
        devices=("npu",), check=_is_function),
    RuntimePatch(
        "dcn_portable", "mmcv.ops.deform_conv:DeformConv2dPack.forward", _deform_conv_forward,
        why="DepthNet's DCN runs mx_driving.deform_conv2d through bevkit.ops (the replacement mx_driving's own "
            "patcher installs for mmcv's DeformConv2dFunction), not mmcv's NPU branch", devices=("npu",),
        check=_is_function),
    RuntimePatch(
        "head_targets_device", f"{HEAD}:BEVDepthHead.get_targets_single", _get_targets_single,
        why="targets are created with device='cuda'; build them on the host and move them to the "
            "boxes' device", devices=("npu", "cpu"), on="memory", check=_is_function),
    RuntimePatch(
        "head_fp32", f"{HEAD}:BEVDepthHead.forward", _head_forward,
        why="upstream's @torch.cuda.amp.autocast(False) leaves NPU/CPU autocast on; keep the head "
            "in fp32 on every device", devices=("npu", "cpu"), on="memory"),
    RuntimePatch(
        "depth_loss_fp32", f"{EXP}:autocast", _cuda_autocast_replacement,
        why="get_depth_loss disables only CUDA autocast; disable it on every device",
        devices=("npu", "cpu"), on="memory"),
    RuntimePatch(
        "training_step_device", f"{EXP}:BEVDepthLightningModel.training_step", _training_step,
        why="training_step calls depth_labels.cuda() unconditionally; Lightning already moved the "
            "batch to the module's device", devices=("npu", "cpu"), on="memory", check=_is_function),
    RuntimePatch(
        "optimizer_per_device", f"{EXP}:BEVDepthLightningModel.configure_optimizers",
        _configure_optimizers,
        why="fused AdamW per device (torch_npu NpuFusedAdamW / CUDA fused / CPU foreach) with "
            "upstream's lr, milestones and weight decay 1e-7 (override: --weight_decay)",
        check=_is_function),
    RuntimePatch(
        "evaluator_data_root", f"{EXP}:BEVDepthLightningModel.__init__", _module_init,
        why="DetNuscEvaluator hard-codes ./data/nuScenes; evaluate against --data_root"),
    RuntimePatch(
        "evaluator_metrics", f"{EVALUATOR}:DetNuscEvaluator._evaluate_single", record_on_evaluate,
        why="upstream drops the metrics it computes; write mAP, NDS and TP errors to metrics.json"),
    RuntimePatch(
        "prediction_samples", f"{EXP}:BEVDepthLightningModel.eval_step", dump_on_eval_step,
        why="dump the boxes the evaluator receives and the key frame's predicted depth for a few samples to "
            "$BEVKIT_RUN_DIR/predictions/ for the pictures (bevkit.visualize)", check=_is_function),
    RuntimePatch(
        "depth_gt_precomputed", f"{DATASET}:NuscDetDataset.get_lidar_depth", _get_lidar_depth,
        why="read depth_gt/<image>.bin made offline by 'python -m bevkit.data.depth_gt' instead of "
            "projecting lidar in the data loader (BEVKIT_DEPTH_GT=auto|precomputed|online)"),
    RuntimePatch(
        "image_decode_names_file", f"{DATASET}:Image", checked_image,
        why="PIL opens lazily: a damaged JPEG fails later as 'image file is truncated' without its name; images "
            "opened stay lazy (JPEG draft mode), and a failure to decode names the file"),
    RuntimePatch(
        "sample_in_data_errors", f"{DATASET}:NuscDetDataset.__getitem__", naming_sample("bevdepth", _sample_token),
        why="a damaged-file error also names the sample token being loaded"),
    RuntimePatch(
        "lightning_checkpoint_weights_only", "lightning_fabric.plugins.io.torch_io:pl_load", _lightning_load,
        why="Lightning 1.9 reads --ckpt_path with a bare torch.load (torch 2.1's default weights_only=False: a file "
            "could run code): through bevkit.torch_load (weights_only first; full unpickling only in trusted "
            "places)"),
    RuntimePatch(
        "no_lidar_read", f"{DATASET}:NuscDetDataset.get_image", _get_image,
        why="get_image loads every key frame's lidar sweep although only get_lidar_depth uses it; with "
            "precomputed depth (all of the sample's depth_gt files, no lidar fusion) none is read",
        check=_is_function),
    RuntimePatch(
        "no_lidar_read_numpy", f"{DATASET}:np", _numpy_for_dataset,
        why="the dataset module's numpy.fromfile hands back a marker instead of reading while get_image skips "
            "the lidar sweeps (any use of it is an error)"),
    RuntimePatch(
        "jpeg_draft", f"{DATASET}:img_transform", _img_transform_draft, enabled=jpeg.enabled,
        why="opt-in (BEVKIT_JPEG_DRAFT=1): decode camera JPEGs at the DCT scale the resize needs (PIL draft "
            "mode): faster loading, slightly different pixels (PSNR in bevdepth/README.md)", check=_is_function),
    RuntimePatch(
        "train_loader_workers", f"{EXP}:BEVDepthLightningModel.train_dataloader", _train_dataloader,
        why="8 training dataloader workers on NPU/CUDA as the DrivingSDK port (upstream 4); BEVKIT_WORKERS sets "
            "the number on any device", check=_is_function),
    RuntimePatch(
        "head_targets_int32", f"{HEAD}:BEVDepthHead.get_targets", _targets_int32, devices=("npu",),
        why="int32 box-centre indices for the head's gathers, as the DrivingSDK port builds them (the NPU "
            "gathers int32 natively)", check=_is_function),
    RuntimePatch(
        "pretrained_offline", f"{LSS}:BaseLSSFPN.__init__", _lss_init,
        why="torchvision://resnet50 downloads at build time; use a verified local file "
            "(bevkit.checkpoints search order) or BEVKIT_PRETRAINED=none"),
])
