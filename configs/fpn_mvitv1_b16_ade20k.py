_base_ = ['./_base_/fpn_ade20k.py', './_base_/mvitv1.py']

model = dict(backbone=_base_.mvitv1.backbone, neck=dict(in_channels=_base_.mvitv1.in_channels))
