_base_ = './_base_/mask_rcnn_pvt.py'

model = dict(backbone=dict(
    type='PVTv2', arch='b1',
    init_cfg=dict(checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b1.pth')))
