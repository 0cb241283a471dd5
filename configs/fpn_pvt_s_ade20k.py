_base_ = './_base_/fpn_pvt_ade20k.py'

model = dict(backbone=dict(
    type='PVT', arch='small',
    init_cfg=dict(checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_small.pth')))
