"""A tiny BEVDepth (2 key frames) for CPU smoke runs and tests: same code path, toy sizes.

Versus the reference experiment: images 64x192 (downsample 16 -> 4x12 features), ResNet-18 with 16 base
channels and no pretrained weights, 14 depth bins of 4 m over [2, 58), 16 BEV channels per frame on a
32x32 grid of 3.2 m, a narrow BEV head (out_size_factor 16). The depth net keeps its DCN.
"""
import copy

from bevdepth.exps.base_cli import run_cli
from bevdepth.exps.nuscenes import base_exp
from bevdepth.exps.nuscenes.base_exp import BEVDepthLightningModel as BaseExp

EXP_NAME = 'bev_depth_tiny_smoke'
FINAL_DIM = (64, 192)
CHANNELS = 16  # BEV channels per key frame
GRID = [-51.2, 51.2, 3.2]  # 32 x 32 BEV cells
OUT_SIZE_FACTOR = 16  # head: 512 grid cells of 0.2 m / 16 = 32

backbone_conf = copy.deepcopy(base_exp.backbone_conf)
backbone_conf.update(
    x_bound=list(GRID), y_bound=list(GRID), d_bound=[2.0, 58.0, 4.0], final_dim=FINAL_DIM,
    output_channels=CHANNELS,
    img_backbone_conf=dict(type='ResNet', depth=18, base_channels=16, frozen_stages=-1,
                           out_indices=[0, 1, 2, 3], norm_eval=False),
    img_neck_conf=dict(type='SECONDFPN', in_channels=[16, 32, 64, 128], upsample_strides=[0.25, 0.5, 1, 2],
                       out_channels=[16, 16, 16, 16]),
    depth_net_conf=dict(in_channels=64, mid_channels=32))

ida_aug_conf = copy.deepcopy(base_exp.ida_aug_conf)
ida_aug_conf.update(final_dim=FINAL_DIM, resize_lim=(0.12, 0.15))  # test resize: 192 / 1600 = 0.12

head_conf = copy.deepcopy(base_exp.head_conf)
head_conf['bev_backbone_conf'].update(in_channels=2 * CHANNELS, base_channels=16)
head_conf['bev_neck_conf'].update(in_channels=[2 * CHANNELS, 16, 32, 64], out_channels=[8, 8, 8, 8])
head_conf['in_channels'] = 32
head_conf['separate_head'] = dict(type='SeparateHead', init_bias=-2.19, final_kernel=3, head_conv=16)
head_conf['train_cfg'].update(out_size_factor=OUT_SIZE_FACTOR,
                              code_weights=[1.0] * 10)
head_conf['test_cfg'].update(out_size_factor=OUT_SIZE_FACTOR)
head_conf['bbox_coder'].update(out_size_factor=OUT_SIZE_FACTOR)


class BEVDepthLightningModel(BaseExp):

    def __init__(self, **kwargs):
        kwargs.update(backbone_conf=backbone_conf, head_conf=head_conf, ida_aug_conf=ida_aug_conf)
        super().__init__(**kwargs)  # builds the model from the confs above
        self.key_idxes = [-1]  # 2 key frames, as the reference experiment
        # from scratch and tiny: lr 1e-3 at the smoke run's global batch 4 (upstream: 2e-4 at 64)
        self.basic_lr_per_img = 2.5e-4

    def train_dataloader(self):
        loader = super().train_dataloader()
        return _with_workers(loader, shuffle=True)

    def val_dataloader(self):
        return _with_workers(super().val_dataloader(), shuffle=False)


def _with_workers(loader, shuffle):
    """2 loader workers (the 2-core smoke machine); upstream uses 4."""
    import torch

    return torch.utils.data.DataLoader(
        loader.dataset, batch_size=loader.batch_size, num_workers=2, drop_last=loader.drop_last,
        shuffle=shuffle, collate_fn=loader.collate_fn)


if __name__ == '__main__':
    run_cli(BEVDepthLightningModel, EXP_NAME)
