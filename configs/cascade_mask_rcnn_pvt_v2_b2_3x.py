_base_ = './_base_/cascade_mask_rcnn_pvt_3x.py'

model = dict(backbone=dict(
    type='PVTv2', arch='b2',
    init_cfg=dict(checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth')))
