_base_ = ['./_base_/mask_rcnn.py', './_base_/t2t_vit.py']

model = dict(backbone=_base_.t2t_vit.backbone, neck=dict(in_channels=_base_.t2t_vit.in_channels))
optim_wrapper = _base_.t2t_vit.optim_wrapper
