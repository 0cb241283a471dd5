# MViTv2-T Cascade Mask R-CNN, detectron2's recipe: ImageNet-1k weights, multi-scale 480-800 with
# the DETR-style crop, 36 epochs, AdamW lr 1.6e-4 / weight decay 0.1 at a batch of 64, AMP.
_base_ = ['./_base_/cascade_mask_rcnn_mvitv2.py', 'mmdet::_base_/datasets/coco_instance.py',
          'mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py',
          './_base_/ms_crop_3x.py']

train_pipeline = [
    *_base_.train_pipeline[:2],  # load the image, boxes and masks
    *_base_.ms_crop_3x.augmentation,
    *_base_.train_pipeline[-1:],  # pack
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))  # 32 GPUs x 2 images
train_cfg = dict(max_epochs=_base_.ms_crop_3x.max_epochs)
optim_wrapper = _base_.mvitv2.recipe.optim_wrapper
param_scheduler = _base_.mvitv2.recipe.param_scheduler
# Published lr at a batch of 64; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=64)
