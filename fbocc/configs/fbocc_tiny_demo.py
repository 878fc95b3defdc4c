# Tiny FB-OCC demo (tools/launch --mode demo, fbocc/test/train_demo.sh): the smoke config trained long enough to
# start learning the synthetic world on 2 CPU processes.
# Versus the smoke config (fbocc_tiny_smoke.py):
# * a 4x wider occupancy head (64 voxel channels into the head instead of 16): the smoke head narrows to 4 channels
#   before its 19 classes and, in one-sample overfit probes, learned no class in 50 steps; 64 learned driveable
#   surface and terrain within 100 samples;
# * AdamW at 5e-3 (2.5x the 2e-3 probed first: faster on the same samples), 10 warm-up steps, x0.1 at 80 %;
# * history fusion from step 20 instead of 5.
_base_ = ['./fbocc_tiny_smoke.py']

max_iters = 150
temporal_start_iter = 20
voxel_out_channel = 64

model = dict(
    img_bev_encoder_neck=dict(out_channels=voxel_out_channel),
    occupancy_head=dict(in_channels=[voxel_out_channel] * 3),
)
optimizer = dict(type='AdamW', lr=5e-3, weight_decay=1e-2)
lr_config = dict(policy='step', warmup='linear', warmup_iters=10, warmup_ratio=0.1, step=[int(max_iters * 0.8)])
runner = dict(type='IterBasedRunner', max_iters=max_iters)
checkpoint_config = dict(interval=max_iters)
evaluation = dict(interval=max_iters)
log_config = dict(interval=10, hooks=[dict(type='TextLoggerHook')])
custom_hooks = [
    dict(type='MEGVIIEMAHook', init_updates=0, priority='NORMAL', interval=max_iters),
    dict(type='SequentialControlHook', temporal_start_iter=temporal_start_iter),
]
