# Performance run of the 8-device recipe: the first 600 iterations (the same count the DrivingSDK port
# measures), with the reference batch and schedule. Temporal fusion switches on at iteration 8004, so
# these steps run without history, exactly like the first 600 steps of the full run.

_base_ = ['./fbocc_r50_8p.py']

performance_iters = 600  # = bevkit.launch.DEFAULT_PERFORMANCE_STEPS, where the launcher stops (tested)
runner = dict(type='IterBasedRunner', max_iters=performance_iters)
checkpoint_config = dict(interval=performance_iters)
evaluation = dict(interval=10 ** 9)
