# The MViTv2 paper's MViTv1-S Mask R-CNN baseline (Li et al., CVPR 2022, Table 4: 47.6 box /
# 43.4 mask AP, 57M parameters, trained 3x with its window design): MViT-B-16 with its ImageNet-1k
# weights, windows of 56 tokens in stage 1 halved per stage, the last block of stages 2-4 global.
# The paper publishes no config for its v1 baselines; what it does not state is taken from its
# MViTv2 models of the same table (configs/README.md says which settings these are): detectron2's
# COCO recipe (AdamW lr 1.6e-4 / weight decay 0.1 at a batch of 64, AMP, 36 epochs, multi-scale
# 480-800 with the DETR-style crop) and the drop path of the MViTv2 variant of the same layout.
_base_ = ['./_base_/mask_rcnn_3x.py', './_base_/mvitv1.py', './_base_/mvitv2.py']

model = dict(
    backbone=dict(_base_.mvitv1.backbone, window_size=56, drop_path_rate=0.2),
    neck=dict(in_channels=_base_.mvitv1.in_channels))
optim_wrapper = _base_.mvitv2.recipe.optim_wrapper  # replaces the layer-decay wrapper whole
param_scheduler = _base_.mvitv2.recipe.param_scheduler
# Published lr at a batch of 64 (32 GPUs x 2 images); other GPU counts: --auto-scale-lr
auto_scale_lr = dict(base_batch_size=64)
