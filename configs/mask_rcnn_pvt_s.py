_base_ = './_base_/mask_rcnn_pvt.py'

model = dict(backbone=dict(
    type='PVT', arch='small',
    init_cfg=dict(checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_small.pth')))
