# detectron2's MViTv2 Cascade Mask R-CNN with large-scale jitter, the L / H recipe: the model of
# ./cascade_mask_rcnn_mvitv2.py on mmdet's LSJ data (flip, resize 0.1-2.0 of 1024, crop 1024;
# testing at 1333x800 as detectron2's), detectron2's optimizer and 36-epoch schedule at a batch
# of 64 (32 GPUs x 2 images). A variant sets the backbone, the neck's in_channels and, for L,
# lr and epochs (../cascade_mask_rcnn_mvitv2_l_lsj.py).
_base_ = ['./cascade_mask_rcnn_mvitv2.py', 'mmdet::common/lsj-100e_coco-instance.py']

# Training images padded to the 1024 square, as detectron2's fixed-size crop pads them.
model = dict(data_preprocessor=dict(
    batch_augments=[dict(type='BatchFixedSizePad', size=(1024, 1024), pad_mask=True)]))

# Epochs count passes over COCO, as detectron2's do (the base repeats the set 4 times).
train_dataloader = dict(dataset=dict(times=1))
train_cfg = dict(max_epochs=36)
optim_wrapper = _base_.mvitv2.recipe.optim_wrapper
param_scheduler = _base_.mvitv2.recipe.param_scheduler
# Published lr at a batch of 64; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=64)
