_base_ = './_base_/retinanet_pvt.py'

model = dict(backbone=dict(
    type='PVTv2', arch='b3',
    init_cfg=dict(checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b3.pth')))
