# MViTv2-L Cascade Mask R-CNN, detectron2's recipe: ImageNet-21k weights (the architecture that
# widens in attention, arch='large'), large-scale jitter at 1024, 50 epochs, lr 1e-4.
_base_ = './_base_/cascade_mask_rcnn_mvitv2_lsj.py'

model = dict(
    backbone=dict(arch='large', init_cfg=dict(
        checkpoint='https://dl.fbaipublicfiles.com/mvit/mvitv2_models/MViTv2_L_in21k.pyth')),
    neck=dict(in_channels=[144, 288, 576, 1152]))
optim_wrapper = dict(optimizer=dict(lr=1e-4))
# 50 epochs, detectron2's 92,187 iterations, with its steps at 81,944 and 88,773 (epochs 44.4 and
# 48.1): the warm-up and the step form of the 36-epoch recipe.
train_cfg = dict(max_epochs=50)
param_scheduler = [
    _base_.mvitv2.recipe.param_scheduler[0],
    *[dict(_base_.mvitv2.recipe.param_scheduler[1], begin=50 * step / 92187, end=50)
      for step in (81944, 88773)],
]
