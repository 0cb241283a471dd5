# Mask R-CNN 3x multi-scale, for any mmpvt backbone: the 1x model with the PVTv2 paper's 3x
# recipe. A config adds a family's backbone block (./mask_rcnn_pvt_3x.py).
_base_ = ['./mask_rcnn.py', './ms_crop_3x.py']

train_pipeline = [
    *_base_.train_pipeline[:2],  # load the image, boxes and masks
    *_base_.ms_crop_3x.augmentation,
    *_base_.train_pipeline[-1:],  # pack
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))  # 8 GPUs x 2 images
train_cfg = dict(max_epochs=_base_.ms_crop_3x.max_epochs)
param_scheduler = _base_.ms_crop_3x.param_scheduler
optim_wrapper = _base_.ms_crop_3x.optim_wrapper
auto_scale_lr = dict(base_batch_size=16)
