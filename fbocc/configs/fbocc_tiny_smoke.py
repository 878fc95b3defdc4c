# Tiny FB-OCC for smoke runs and tests: 2 CPU processes at a few seconds per step on the synthetic dataset.
# Same modules and code paths as the reference (LSS forward projection, depth-aware backward projection,
# BEV self-attention, temporal fusion switched on by SequentialControlHook, 3-D ResNet/FPN, occupancy head
# with all four losses, depth supervision, EMA), with a quarter-width ResNet-18 image backbone, 128x352 images,
# 20 depth bins, 16 BEV channels, 2 history frames and thin 3-D layers (8/16/32 channels). The LSS grid (100x100x8) and the occupancy
# grid (200x200x16, Occ3D) keep their real sizes, because the head's output must match Occ3D.
# No pretrained checkpoints.
import os

_fbbev_root = os.environ.get('FBBEV_ROOT') or '{{ fileDirname }}/../../upstream/FB-BEV'
_base_ = [_fbbev_root + '/occupancy_configs/fb_occ/fbocc-r50-cbgs_depth_16f_16x4_20e.py']

samples_per_gpu = 1
max_iters = 12
temporal_start_iter = 4  # history fusion on from step 5

data_config = {
    'cams': ['CAM_FRONT_LEFT', 'CAM_FRONT', 'CAM_FRONT_RIGHT', 'CAM_BACK_LEFT', 'CAM_BACK', 'CAM_BACK_RIGHT'],
    'Ncams': 6,
    'input_size': (128, 352),
    'src_size': (900, 1600),
    'resize': (-0.06, 0.11),
    'rot': (-5.4, 5.4),
    'flip': True,
    'crop_h': (0.0, 0.0),
    'resize_test': 0.00,
}
grid_config = {
    'x': [-40, 40, 0.8],
    'y': [-40, 40, 0.8],
    'z': [-1, 5.4, 0.8],
    'depth': [2.0, 42.0, 2.0],
}
depth_categories = 20
numC_Trans = 16
voxel_channels = [8, 16, 32]
voxel_out_channel = 16
history_cat_num = 2
use_checkpoint = False
sync_bn = False

model = dict(
    history_cat_num=history_cat_num,
    single_bev_num_channels=numC_Trans,
    img_backbone=dict(
        _delete_=True, type='ResNet', depth=18, base_channels=16, num_stages=4, out_indices=(2, 3), frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False, with_cp=False, style='pytorch'),
    img_neck=dict(in_channels=[64, 128], out_channels=32, with_cp=False),
    depth_net=dict(in_channels=32, mid_channels=32, context_channels=numC_Trans, grid_config=grid_config,
                   depth_channels=depth_categories, with_cp=False),
    forward_projection=dict(grid_config=grid_config, input_size=data_config['input_size']),
    backward_projection=dict(
        in_channels=numC_Trans, out_channels=numC_Trans,
        transformer=dict(
            embed_dims=numC_Trans,
            encoder=dict(
                data_config=data_config,
                transformerlayers=dict(
                    attn_cfgs=[
                        dict(type='MultiScaleDeformableAttention', embed_dims=numC_Trans, dropout=0.0,
                             num_levels=1),
                        dict(type='DA_SpatialCrossAttention', pc_range=[-40, -40, -1.0, 40, 40, 5.4],
                             dbound=grid_config['depth'], dropout=0.0,
                             deformable_attention=dict(type='DA_MSDeformableAttention', embed_dims=numC_Trans,
                                                       num_points=8, num_levels=1),
                             embed_dims=numC_Trans),
                    ],
                    ffn_cfgs=dict(embed_dims=numC_Trans, feedforward_channels=numC_Trans * 4),
                    feedforward_channels=numC_Trans * 4))),
        positional_encoding=dict(num_feats=numC_Trans // 2)),
    img_bev_encoder_backbone=dict(n_input_channels=numC_Trans, block_inplanes=voxel_channels, with_cp=False),
    img_bev_encoder_neck=dict(in_channels=voxel_channels, out_channels=voxel_out_channel, with_cp=False),
    occupancy_head=dict(in_channels=[voxel_out_channel] * 3, with_cp=False),
)

data = dict(
    samples_per_gpu=samples_per_gpu,
    workers_per_gpu=1,
)

optimizer = dict(type='AdamW', lr=1e-3, weight_decay=1e-2)
lr_config = dict(policy='step', warmup='linear', warmup_iters=2, warmup_ratio=0.1, step=[max_iters])
runner = dict(type='IterBasedRunner', max_iters=max_iters)
checkpoint_config = dict(interval=max_iters)
evaluation = dict(interval=max_iters)  # the EMA model is evaluated at the end (CustomDistEvalHook)
log_config = dict(interval=1, hooks=[dict(type='TextLoggerHook')])
custom_hooks = [
    dict(type='MEGVIIEMAHook', init_updates=0, priority='NORMAL', interval=max_iters),
    dict(type='SequentialControlHook', temporal_start_iter=temporal_start_iter),
]
load_from = None
# fp16: the reference recipe's (loss_scale='dynamic', mmcv's Fp16OptimizerHook) on NPU/CUDA; off on CPU (the kit's
# device policy), so smoke runs on a device take its AMP path with gradient clipping (max_norm 5).
