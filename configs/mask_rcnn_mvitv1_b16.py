_base_ = ['./_base_/mask_rcnn.py', './_base_/mvitv1.py']

model = dict(backbone=_base_.mvitv1.backbone, neck=dict(in_channels=_base_.mvitv1.in_channels))
optim_wrapper = _base_.mvitv1.optim_wrapper  # merged into the base's AdamW
