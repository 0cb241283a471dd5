# MViTv2-H Cascade Mask R-CNN, detectron2's recipe: ImageNet-21k weights, large-scale jitter at
# 1024, 36 epochs, lr 1.6e-4, activation checkpointing.
_base_ = './_base_/cascade_mask_rcnn_mvitv2_lsj.py'

model = dict(
    backbone=dict(arch='huge', with_cp=True, init_cfg=dict(
        checkpoint='https://dl.fbaipublicfiles.com/mvit/mvitv2_models/MViTv2_H_in21k.pyth')),
    neck=dict(in_channels=[192, 384, 768, 1536]))
