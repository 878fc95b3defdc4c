"""BEVDepth R50 256x704 2-key-frame experiment, unchanged from upstream (reference: mAP 0.3304, NDS 0.4355).

Run through the kit (``bevdepth/run.py`` applies the runtime patches first), e.g. by
``bevdepth/test/train_8p_full.sh``.
"""
from bevdepth.exps.base_cli import run_cli
from bevdepth.exps.nuscenes.mv.bev_depth_lss_r50_256x704_128x128_24e_2key import BEVDepthLightningModel

EXP_NAME = 'bev_depth_lss_r50_256x704_128x128_24e_2key'

if __name__ == '__main__':
    run_cli(BEVDepthLightningModel, EXP_NAME)
