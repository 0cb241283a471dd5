_base_ = './_base_/retinanet_pvt.py'

model = dict(backbone=dict(
    type='PVT', arch='medium', drop_path_rate=0.0,  # as released: no stochastic depth for M/L detectors
    init_cfg=dict(checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_medium.pth')))
