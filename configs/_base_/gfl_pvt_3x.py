# GFL 3x multi-scale with a PVTv2 backbone, as in the PVTv2 paper: mmdet's GFL, the 3x recipe.
# A variant sets the backbone's arch and checkpoint.
_base_ = ['mmdet::gfl/gfl_r50_fpn_1x_coco.py', './ms_crop_3x.py']

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # replaces the ResNet-50 of mmdet's base
        type='PVTv2',
        arch='b2',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        # The authors' ImageNet weights; train from scratch with
        # --cfg-options model.backbone.init_cfg=None
        init_cfg=dict(type='Pretrained',
                      checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))  # FPN from stage 2, extra levels on its outputs

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
