# ATSS 3x multi-scale, as in the PVTv2 paper, for any mmpvt backbone: mmdet's ATSS, the 3x
# recipe. A config adds a family's backbone block (./atss_pvt_3x.py).
_base_ = ['mmdet::atss/atss_r50_fpn_1x_coco.py', './ms_crop_3x.py']

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

train_pipeline = [
    *_base_.train_pipeline[:2],  # load the image and boxes
    *_base_.ms_crop_3x.augmentation,
    *_base_.train_pipeline[-1:],  # pack
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))  # 8 GPUs x 2 images
train_cfg = dict(max_epochs=_base_.ms_crop_3x.max_epochs)
param_scheduler = _base_.ms_crop_3x.param_scheduler
optim_wrapper = _base_.ms_crop_3x.optim_wrapper
# Published lr at a batch of 16; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
