"""FB-OCC runtime patches (patch set 'fbocc'), one named :class:`~bevkit.patching.RuntimePatch` per change.

Every change to FB-BEV's behaviour that is not in fbocc/fbocc.patch is listed here with its reason and the
devices it applies to; the code lives by concern:

- :mod:`.device`: device portability (placement, DDP wrappers, process group, 'cuda' tensors, autocast, SyncBN);
- :mod:`.ops`: operators through bevkit.ops;
- :mod:`.losses`: the occupancy losses (focal loss, NaN/Inf cleaning, which is exact and applies everywhere), the
  labels and test output of a head at another grid than the labels' (no deblock, a z offset);
- :mod:`.checkpoints`: resume with the full training state, the checked checkpoint compared with the built model,
  FB-BEV's own checkpoint load through the kit's weights_only loader;
- :mod:`.data`: info paths relative to the data root, decode errors that name the file and the sample;
- :mod:`.npu`: rank <= 6 matmul rewrites and the Conv3d shortcut rewrite, NPU only (needed there; on CPU/CUDA
  the upstream code is already right and the rewrite measured no faster, see fbocc/README.md);
- :mod:`.speed`: the DrivingSDK port's speed techniques (fused add+relu and the stem max-pool in the ResNets,
  trilinear resizing on reversed axes, masked_select for boolean-mask indexing; NPU only) and pinned dataloader
  memory (NPU and CUDA); the port's npu_batch_matmul is 'fbocc-npu-batch-matmul' on :mod:`.npu`'s matvec;
- :func:`bevkit.models.fbocc.results.record_on_evaluate`: the mIoU into metrics.json;
- :func:`bevkit.models.fbocc.pictures.dump_on_evaluate_occupancy`: a few evaluated samples for the pictures.

The replacements are written from the documented maths (the upstream op contracts), not copied; float64
parity tests (test/fbocc_checks.py) compare each one with the upstream formulation. The config finalization is
not a patch: it is a visible line in tools/train.py and tools/test.py (:func:`bevkit.models.fbocc.config.finalize`).
"""
from __future__ import annotations

from bevkit.data.decode import checked_image
from bevkit.models.fbocc.patches.data import _infos_in_data_root, sample_in_data_errors
from bevkit.models.fbocc.patches.checkpoints import _checked_load, _resume, _torch_safe_load
from bevkit.models.fbocc.patches.device import (_autocast_for_device, _build_model, _current_device, _ddp_factory,
                                                _dp_factory, _init_dist_pytorch, _module_cuda,
                                                _torch_with_run_device, _with_device)
from bevkit.models.fbocc.patches.losses import (_coarse_output_on_grid, _focal_forward, _focal_init,
                                                _head_grids, _labels_per_output_grid, _loss_voxel)
from bevkit.models.fbocc.patches.npu import _batch_matvec, _cam2ego_coor, _conv1x1x1, _lidar_coor, _point_sampling
from bevkit.data import jpeg
from bevkit.models.fbocc.patches.speed import (_basic_block3d_forward, _basic_block_forward, _bottleneck3d_forward,
                                               _bottleneck_forward, _functional_trilinear_reversed, _jpeg_draft,
                                               _masked_select_indexing, _pinned_dataloader, _stem_layer,
                                               masked_select_possible)
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
DATASET = "mmdet3d.datasets.nuscenes_dataset:NuScenesDataset"
SAMPLER = "mmdet3d.datasets.samplers.infinite_group_each_sample_in_batch_sampler"
RESNET = "mmdet.models.backbones.resnet"
RESNET3D = f"{FB}.modules.resnet3d"
#: runs whose tensors are not in CUDA memory (matched on the memory: an emulated cuda run needs these too)
NO_CUDA = ("npu", "cpu")
NPU = ("npu",)
ACCELERATORS = ("npu", "cuda")

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
                 lambda orig: _with_device(orig), devices=NO_CUDA, on="memory",
                 why="init_random_seed broadcasts the seed in a 'cuda' tensor."),
    RuntimePatch("fbocc-sampler-seed-sync", f"{SAMPLER}:sync_random_seed",
                 lambda orig: _with_device(orig), devices=NO_CUDA, on="memory",
                 why="The group-each-sample sampler syncs its seed via dist.broadcast of a 'cuda' tensor."),
    RuntimePatch("fbocc-eval-collect-device", "mmdet3d.apis.test:torch", _torch_with_run_device,
                 devices=NO_CUDA, on="memory",
                 why="custom_multi_gpu_test's collect_results_cpu broadcasts its temp-dir name in 'cuda' tensors."),
    RuntimePatch("fbocc-model-placement", f"{DETECTOR}:FBOCC.cuda", _module_cuda, devices=NO_CUDA, on="memory",
                 why="apis/train.py and tools/test.py place the model with model.cuda(): it goes to the run's "
                     "device (npu:LOCAL_RANK or cpu) instead."),
    RuntimePatch("fbocc-current-device", "torch.cuda:current_device", _current_device, devices=NO_CUDA, on="memory",
                 why="DDP construction passes torch.cuda.current_device(), which raises without CUDA; the DDP "
                     "factory ignores it."),
    RuntimePatch("fbocc-init-dist-cpu", "mmcv.runner.dist_utils:_init_dist_pytorch", _init_dist_pytorch,
                 devices=NO_CUDA, on="memory",
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
                 devices=NO_CUDA, on="memory",
                 why="The depth BCE disables torch.cuda.amp autocast only; disable the run device's autocast."),
    RuntimePatch("fbocc-semkitti-autocast", f"{FB}.modules.occ_loss_utils.semkitti:autocast",
                 _autocast_for_device, devices=NO_CUDA, on="memory",
                 why="sem/geo scal losses disable torch.cuda.amp autocast only."),
    RuntimePatch("fbocc-lovasz-autocast", f"{FB}.modules.occ_loss_utils.lovasz_softmax:autocast",
                 _autocast_for_device, devices=NO_CUDA, on="memory",
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
                 _msda_pytorch, devices=NO_CUDA, on="memory",
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
    RuntimePatch("fbocc-occ-head-grids", f"{FB}.heads.occupancy_head:OccHead.__init__", _head_grids,
                 why="OccHead accepts final_occ_size (Occ3D's 200x200x16) and drops it; kept as the grid a head "
                     "without the deblock evaluates on. New output_range: the z range the head's output covers "
                     "when it is not the labels' (the demo's LSS grid, 0.4 m higher)."),
    RuntimePatch("fbocc-occ-labels-per-grid", f"{FB}.heads.occupancy_head:OccHead.loss", _labels_per_output_grid,
                 why="Heads coarser than the labels on some axes only, or offset from them in z: upstream "
                     "downsamples the labels with one ratio for all axes and assumes the same range; the labels "
                     "are moved to output_range and repeated on the finer axes, so its mode is taken over each "
                     "voxel's own block."),
    RuntimePatch("fbocc-coarse-occ-output", f"{FB}.heads.occupancy_head:OccHead.forward", _coarse_output_on_grid,
                 why="A head built without the deblock (use_deblock=False: the demo config, ~4x cheaper steps) "
                     "trains on downsampled labels upstream but tests at the coarse grid; its evaluation logits "
                     "are upsampled (nearest) to final_occ_size and moved from output_range to the Occ3D grid. "
                     "Heads with the deblock are untouched."),
    # --- data ------------------------------------------------------------------------------------
    RuntimePatch("fbocc-infos-in-data-root", f"{DATASET}.load_annotations", _infos_in_data_root,
                 why="The kit's info files hold paths relative to the data root (a copied or moved root reads its own "
                     "files); the dataset opens them as stored, so they are joined with the data root on load."),
    RuntimePatch("fbocc-image-decode-names-file", "mmdet3d.datasets.pipelines.loading:Image", checked_image,
                 why="PIL opens lazily: a damaged JPEG fails later as 'image file is truncated' without its name. "
                     "Images stay lazy (JPEG draft mode), and a failure to decode names the file."),
    RuntimePatch("fbocc-sample-in-data-errors", f"{DATASET}.__getitem__", sample_in_data_errors,
                 why="A damaged-file error also names the sample token being loaded."),
    # --- checkpoints -----------------------------------------------------------------------------
    RuntimePatch("fbocc-resume", "mmcv.runner:IterBasedRunner.resume", _resume,
                 why="--resume: mmcv maps the checkpoint to 'cuda', resumes one iteration short (it records the "
                     "0-based iteration) and drops the fp16 loss scaler; load on the CPU, count completed "
                     "iterations, keep the scaler, hand EMA and RNG state to BevkitResumeHook."),
    RuntimePatch("fbocc-checkpoint-complete", "mmcv.runner:load_checkpoint", _checked_load,
                 why="tools/test.py loads the evaluated weights with strict=False (a wrong file evaluates random "
                     "weights): the checkpoint the launcher checked is compared key by key with the model first."),
    RuntimePatch("fbocc-checkpoint-complete-runner", "mmcv.runner.base_runner:load_checkpoint", _checked_load,
                 why="The same check for runner.load_checkpoint (load_from: --checkpoint on training; resume)."),
    RuntimePatch("fbocc-ema-weights-only", "mmdet3d.core.hook.ema:torch", _torch_safe_load,
                 why="MEGVIIEMAHook(resume=...) reads an EMA file with a bare torch.load: through the kit's "
                     "weights_only loader (bevkit.torch_load)."),
    # --- speed: the DrivingSDK port's techniques, exact in maths ------------------------------------
    RuntimePatch("fbocc-npu-batch-matmul", "bevkit.models.fbocc.patches.npu:matvec", _batch_matvec, devices=NPU,
                 why="The 3x3 matrix-times-vector products of the rank <= 6 rewrites as mx_driving.npu_batch_matmul "
                     "(multiply and sum on the vector unit), as the port's BatchMatmul patch does for torch.matmul."),
    RuntimePatch("fbocc-resnet-add-relu", f"{RESNET}:BasicBlock.forward", _basic_block_forward, devices=NPU,
                 why="Image backbone blocks end with mx_driving.npu_add_relu (fused shortcut add + relu); with_cp "
                     "kept."),
    RuntimePatch("fbocc-resnet-bottleneck-add-relu", f"{RESNET}:Bottleneck.forward", _bottleneck_forward,
                 devices=NPU, why="The same for the ResNet-50 bottleneck blocks of the reference recipe."),
    RuntimePatch("fbocc-resnet-stem-maxpool", f"{RESNET}:ResNet._make_stem_layer", _stem_layer, devices=NPU,
                 why="The stem max-pool runs mx_driving.npu_max_pool2d when no gradient is needed (evaluation; the "
                     "op has no backward)."),
    RuntimePatch("fbocc-resnet3d-add-relu", f"{RESNET3D}:BasicBlock.forward", _basic_block3d_forward, devices=NPU,
                 why="The 3-D BEV encoder's blocks end with mx_driving.npu_add_relu (dense branch)."),
    RuntimePatch("fbocc-resnet3d-bottleneck-add-relu", f"{RESNET3D}:Bottleneck.forward", _bottleneck3d_forward,
                 devices=NPU, why="The same for the 3-D bottleneck blocks."),
    RuntimePatch("fbocc-fpn3d-trilinear-axes", f"{FB}.modules.fpn3d:F", _functional_trilinear_reversed,
                 devices=NPU, why="FPN3D's trilinear upsampling on reversed spatial axes (faster "
                                  "aclnnUpsampleTrilinear, same taps)."),
    RuntimePatch("fbocc-occ-head-trilinear-axes", f"{FB}.heads.occupancy_head:F", _functional_trilinear_reversed,
                 devices=NPU, why="OccHead.forward_coarse_voxel's trilinear upsampling, the same way."),
    RuntimePatch("fbocc-masked-select-prepare", f"{VT}:LSSViewTransformerFunction3D.voxel_pooling_prepare_v2",
                 _masked_select_indexing, devices=NPU, enabled=masked_select_possible,
                 why="Boolean-mask indexing of the frustum points as torch.masked_select (one NPU op)."),
    RuntimePatch("fbocc-masked-select-prepare-2d", f"{VT}:LSSViewTransformerFunction.voxel_pooling_prepare_v2",
                 _masked_select_indexing, devices=NPU, enabled=masked_select_possible,
                 why="The same in the 2-D LSS view transformer."),
    RuntimePatch("fbocc-masked-select-depth-loss", f"{FB}.modules.depth_net:CM_DepthNet.get_depth_loss",
                 _masked_select_indexing, devices=NPU, enabled=masked_select_possible,
                 why="The depth loss's foreground selection as torch.masked_select."),
    RuntimePatch("fbocc-pin-memory", "mmdet3d.datasets.builder:DataLoader", _pinned_dataloader,
                 devices=ACCELERATORS,
                 why="build_dataloader hard-codes pin_memory=False; pinned batches copy to the accelerator "
                     "asynchronously (the port sets True)."),
    RuntimePatch("fbocc-jpeg-draft", "mmdet3d.datasets.pipelines.loading:PrepareImageInputs.img_transform_core",
                 _jpeg_draft, enabled=jpeg.enabled,
                 why="opt-in (BEVKIT_JPEG_DRAFT=1): decode camera JPEGs at the DCT scale the resize needs (PIL draft "
                     "mode): faster loading, slightly different pixels."),
    # --- results ----------------------------------------------------------------------------------
    RuntimePatch("fbocc-metrics-json", "mmdet3d.datasets.nuscenes_dataset:NuScenesDataset.evaluate",
                 record_on_evaluate,
                 why="Write the occupancy mIoU and per-class IoU to $BEVKIT_RUN_DIR/metrics.json."),
    RuntimePatch("fbocc-prediction-samples", "mmdet3d.datasets.nuscenes_dataset:NuScenesDataset.evaluate_occupancy",
                 dump_on_evaluate_occupancy,
                 why="Dump what the evaluator scores for a few samples (prediction, ground truth, camera mask, "
                     "camera projections) to $BEVKIT_RUN_DIR/predictions/ for the pictures (bevkit.visualize)."),
])
