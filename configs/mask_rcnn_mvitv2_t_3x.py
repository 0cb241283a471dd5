# MViTv2-T Mask R-CNN, detectron2's recipe: ImageNet-1k weights, multi-scale 480-800 with the
# DETR-style crop, 36 epochs, AdamW lr 1.6e-4 / weight decay 0.1 at a batch of 64, AMP; mmdet's
# FPN (no norm), 1-conv RPN and 2fc box head, as detectron2's standard Mask R-CNN.
_base_ = ['./_base_/mask_rcnn_3x.py', './_base_/mvitv2.py']

model = dict(backbone=_base_.mvitv2.backbone, neck=dict(in_channels=_base_.mvitv2.in_channels))
optim_wrapper = _base_.mvitv2.recipe.optim_wrapper
param_scheduler = _base_.mvitv2.recipe.param_scheduler
# Published lr at a batch of 64 (32 GPUs x 2 images); other GPU counts: --auto-scale-lr
auto_scale_lr = dict(base_batch_size=64)
