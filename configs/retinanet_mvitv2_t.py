_base_ = ['./_base_/retinanet.py', './_base_/mvitv2.py']

# FPN from stride 8, as RetinaNet's: the stride-4 level is not built (no unused parameters).
model = dict(backbone=dict(_base_.mvitv2.backbone, out_indices=(1, 2, 3)),
             neck=dict(in_channels=_base_.mvitv2.in_channels[1:], start_level=0))
