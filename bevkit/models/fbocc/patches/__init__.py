"""FB-OCC runtime patches (patch set 'fbocc'), one named :class:`~bevkit.patching.RuntimePatch` per change.

Every change to FB-BEV's behaviour that is not in fbocc/fbocc.patch is listed here with its reason and the
devices it applies to; the code lives by concern:

- :mod:`.device`: device portability (placement, DDP wrappers, process group, 'cuda' tensors, autocast, SyncBN);
- :mod:`.ops`: operators through bevkit.ops;
- :mod:`.losses`: the occupancy losses (focal loss, NaN/Inf cleaning, which is exact and applies everywhere);
- :mod:`.npu`: rank <= 6 matmul rewrites and the Conv3d shortcut rewrite, NPU only (needed there; on CPU/CUDA
  the upstream code is already right and the rewrite measured no faster, see fbocc/README.md);
- :func:`bevkit.models.fbocc.results.record_on_evaluate`: the mIoU into metrics.json;
- :func:`bevkit.models.fbocc.pictures.dump_on_evaluate_occupancy`: a few evaluated samples for the pictures.

The replacements are written from the documented maths (the upstream op contracts), not copied; float64
parity tests (test/fbocc_checks.py) compare each one with the upstream formulation. The config finalization is
not a patch: it is a visible line in tools/train.py and tools/test.py (:func:`bevkit.models.fbocc.config.finalize`).
"""
from __future__ import annotations

from bevkit.models.fbocc.patches.device import (_autocast_for_device, _build_model, _current_device, _ddp_factory,
                                                _dp_factory, _init_dist_pytorch, _module_cuda,
                                                _torch_with_run_device, _with_device)
from bevkit.models.fbocc.patches.losses import _focal_forward, _focal_init, _loss_voxel
from bevkit.models.fbocc.patches.npu import _cam2ego_coor, _conv1x1x1, _lidar_coor, _point_sampling
from bevkit.models.fbocc.patches.ops import _bev_pool, _da_msda_forward, _functional_with_ops, _msda_pytorch
from bevkit.models.fbocc.pictures import dump_on_evaluate_occupancy
from bevkit.models.fbocc.results import record_on_evaluate
from bevkit.patching import PatchSet, RuntimePatch

FB = "mmdet3d.models.fbbev"
VT = f"{FB}.view_transformation.forward_projection.view_transformer"
BEVFORMER = f"{FB}.view_transformation.backward_projection.bevformer_utils"
SCA = f"{BEVFORMER}.spatial_cross_attention_depth"
ENCODER = f"{BEVFORMER}.bevformer_encoder"
DETECTOR = f"{FB}.detectors.fbocc"
FOCAL = f"{FB}.modules.occ_loss_utils.focal_loss"
SAMPLER = "mmdet3d.datasets.samplers.infinite_group_each_sample_in_batch_sampler"
NO_CUDA = ("npu", "cpu")

PATCHES = PatchSet("fbocc", [
    # --- build -----------------------------------------------------------------------------------
    RuntimePatch("fbocc-sync-bn-policy", "mmdet3d.models:build_model", _build_model,
                 why="SyncBatchNorm (config SyncBN and the hard-coded nn.SyncBatchNorm of the history fusion) "
                     "only works on accelerators with several processes; elsewhere it becomes BatchNorm."),
    # --- device portability -----------------------------------------------------------------------
    RuntimePatch("fbocc-focal-loss-init", f"{FOCAL}:CustomFocalLoss.__init__", _focal_init,
                 why="CustomFocalLoss.__init__ calls .cuda() on its radial weight map: model build fails "
                     "without CUDA. The map becomes a non-persistent buffer that follows the module."),
    RuntimePatch("fbocc-seed-broadcast", "mmdet3d.apis:init_random_seed",
                 lambda orig: _with_device(orig), devices=NO_CUDA,
                 why="init_random_seed broadcasts the seed in a 'cuda' tensor."),
    RuntimePatch("fbocc-sampler-seed-sync", f"{SAMPLER}:sync_random_seed",
                 lambda orig: _with_device(orig), devices=NO_CUDA,
                 why="The group-each-sample sampler syncs its seed via dist.broadcast of a 'cuda' tensor."),
    RuntimePatch("fbocc-eval-collect-device", "mmdet3d.apis.test:torch", _torch_with_run_device,
                 devices=NO_CUDA,
                 why="custom_multi_gpu_test's collect_results_cpu broadcasts its temp-dir name in 'cuda' tensors."),
    RuntimePatch("fbocc-model-placement", f"{DETECTOR}:FBOCC.cuda", _module_cuda, devices=NO_CUDA,
                 why="apis/train.py and tools/test.py place the model with model.cuda(): it goes to the run's "
                     "device (npu:LOCAL_RANK or cpu) instead."),
    RuntimePatch("fbocc-current-device", "torch.cuda:current_device", _current_device, devices=NO_CUDA,
                 why="DDP construction passes torch.cuda.current_device(), which raises without CUDA; the DDP "
                     "factory ignores it."),
    RuntimePatch("fbocc-init-dist-cpu", "mmcv.runner.dist_utils:_init_dist_pytorch", _init_dist_pytorch,
                 devices=NO_CUDA,
                 why="mmcv init_dist('pytorch') calls torch.cuda.set_device(rank % device_count()) off NPU: a "
                     "ZeroDivisionError on CPU. CPU and emulated devices just join the gloo process group."),
    RuntimePatch("fbocc-ddp-train", "mmdet3d.apis.train:MMDistributedDataParallel", _ddp_factory,
                 why="DDP wrapper per device: mmcv NPUDistributedDataParallel on NPU, MMDistributedDataParallel "
                     "on CUDA, torch DDP (gloo, device_ids=None) on CPU."),
    RuntimePatch("fbocc-ddp-test", "mmcv.parallel:MMDistributedDataParallel", _ddp_factory,
                 why="tools/test.py imports MMDistributedDataParallel from mmcv.parallel (after activation)."),
    RuntimePatch("fbocc-dp-train", "mmdet3d.apis.train:MMDataParallel", _dp_factory,
                 why="Single-process (launcher none) training wraps with MMDataParallel on GPU ids."),
    RuntimePatch("fbocc-dp-test", "mmcv.parallel:MMDataParallel", _dp_factory,
                 why="Single-process tools/test.py wraps with MMDataParallel on GPU ids."),
    RuntimePatch("fbocc-depth-loss-autocast", f"{FB}.modules.depth_net:autocast", _autocast_for_device,
                 devices=NO_CUDA,
                 why="The depth BCE disables torch.cuda.amp autocast only; disable the run device's autocast."),
    RuntimePatch("fbocc-semkitti-autocast", f"{FB}.modules.occ_loss_utils.semkitti:autocast",
                 _autocast_for_device, devices=NO_CUDA,
                 why="sem/geo scal losses disable torch.cuda.amp autocast only."),
    RuntimePatch("fbocc-lovasz-autocast", f"{FB}.modules.occ_loss_utils.lovasz_softmax:autocast",
                 _autocast_for_device, devices=NO_CUDA,
                 why="Lovasz loss disables torch.cuda.amp autocast only."),
    # --- ops through bevkit.ops -------------------------------------------------------------------
    RuntimePatch("fbocc-bev-pool-v2", f"{VT}:bev_pool_v2", _bev_pool,
                 why="LSS pooling (LSSViewTransformerFunction and ...3D) needs FB-BEV's CUDA extension; "
                     "bevkit.ops.bev_pool_v2 has CUDA, NPU (mx_driving) and portable backends."),
    RuntimePatch("fbocc-bev-pool-v2-necks", "mmdet3d.models.necks.view_transformer:bev_pool_v2", _bev_pool,
                 why="The BEVDet LSS view transformers (LSSViewTransformer, LSSViewTransformer2) use the same "
                     "CUDA extension."),
    RuntimePatch("fbocc-da-msda", f"{SCA}:DA_MSDeformableAttention.forward", _da_msda_forward,
                 why="Upstream drops the depth-aware weighting whenever value is not a CUDA tensor; this forward "
                     "keeps it on every device and runs both MSDA calls through bevkit.ops."),
    RuntimePatch("fbocc-msda-self-attn", "mmcv.ops.multi_scale_deform_attn:multi_scale_deformable_attn_pytorch",
                 _msda_pytorch, devices=NO_CUDA,
                 why="mmcv MultiScaleDeformableAttention (BEV self-attention) falls back to this name off CUDA: "
                     "route it through bevkit.ops (mx_driving kernel on NPU)."),
    RuntimePatch("fbocc-history-grid-sample", f"{DETECTOR}:F", _functional_with_ops,
                 why="fuse_history's 5-D grid_sample goes through bevkit.ops.grid_sample_3d (mx_driving "
                     "grid_sampler3d on NPU; torch elsewhere)."),
    RuntimePatch("fbocc-focal-loss-op", f"{FOCAL}:CustomFocalLoss.forward", _focal_forward,
                 why="The focal term comes from bevkit.ops.sigmoid_focal_loss on every device (upstream picks "
                     "mmcv's CUDA kernel or a one-hot python version by device)."),
    # --- NPU reformulations and loss cleaning -----------------------------------------------------
    RuntimePatch("fbocc-lidar-coor-rank6", f"{VT}:LSSViewTransformerFunction3D.get_lidar_coor", _lidar_coor,
                 devices=("npu",), why="NPU matmul supports rank <= 6; upstream uses rank-7 matmuls."),
    RuntimePatch("fbocc-lidar-coor-rank6-2d", f"{VT}:LSSViewTransformerFunction.get_lidar_coor", _lidar_coor,
                 devices=("npu",), why="Same rank-7 matmuls in the 2-D LSS view transformer."),
    RuntimePatch("fbocc-cam2ego-coor-rank6", f"{VT}:LSSViewTransformerFunction3D.get_cam2ego_coor",
                 _cam2ego_coor, devices=("npu",),
                 why="Rank-7 matmuls; also derives upstream's hard-coded 0.4 m / 200x200x16 from grid_config."),
    RuntimePatch("fbocc-point-sampling-rank6", f"{ENCODER}:bevformer_encoder.point_sampling", _point_sampling,
                 devices=("npu",), why="Rank-7 matmuls when projecting BEV anchors into the cameras."),
    RuntimePatch("fbocc-conv3d-shortcut-stride", f"{FB}.modules.resnet3d:conv1x1x1", _conv1x1x1,
                 devices=("npu",),
                 why="NPU Conv3d does not support stride > kernel size (the 1x1x1 stride-2 shortcut convs)."),
    RuntimePatch("fbocc-occ-loss-nan", f"{FB}.heads.occupancy_head:OccHead.loss_voxel", _loss_voxel,
                 why="Clear NaN/Inf logits with nan_to_num (exact, no host sync); the NPU port's multiply-by-"
                     "mask kept NaN."),
    # --- results ----------------------------------------------------------------------------------
    RuntimePatch("fbocc-metrics-json", "mmdet3d.datasets.nuscenes_dataset:NuScenesDataset.evaluate",
                 record_on_evaluate,
                 why="Write the occupancy mIoU and per-class IoU to $BEVKIT_RUN_DIR/metrics.json."),
    RuntimePatch("fbocc-prediction-samples", "mmdet3d.datasets.nuscenes_dataset:NuScenesDataset.evaluate_occupancy",
                 dump_on_evaluate_occupancy,
                 why="Dump what the evaluator scores for a few samples (prediction, ground truth, camera mask, "
                     "camera projections) to $BEVKIT_RUN_DIR/predictions/ for the pictures (bevkit.visualize)."),
])
