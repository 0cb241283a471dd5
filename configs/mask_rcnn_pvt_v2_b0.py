_base_ = './_base_/mask_rcnn_pvt.py'

model = dict(
    backbone=dict(
        type='PVTv2', arch='b0',
        init_cfg=dict(checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b0.pth')),
    neck=dict(in_channels=[32, 64, 160, 256]))  # PVTv2-b0's stage widths
