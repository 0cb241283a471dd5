_base_ = ['./_base_/mask_rcnn.py', './_base_/mvitv2.py']

model = dict(backbone=_base_.mvitv2.backbone, neck=dict(in_channels=_base_.mvitv2.in_channels))
