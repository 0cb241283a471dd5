# DETR with PVT-Small, 50 epochs (PVT v1 paper): the backbone hands only its stage-4 map
# (stride 32, 512 channels) to the transformer, like DETR's ResNet-50 C5.
_base_ = ['mmdet::detr/detr_r50_8xb2-150e_coco.py', './_base_/pvt.py']

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(pad_size_divisor=32),  # as released
    backbone=dict(
        _base_.pvt.backbone,
        type='PVT',
        arch='small',
        out_indices=(3, ),
        init_cfg=dict(type='Pretrained',
                      checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_small.pth')),
    neck=dict(in_channels=[512]))

# The release's augmentation: a short side of 640 to 800 (steps of 32) and a flip, no crop.
train_pipeline = [
    *_base_.train_pipeline[:2],  # load the image and boxes
    dict(type='RandomChoiceResize', scales=[(1333, s) for s in range(640, 801, 32)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    *_base_.train_pipeline[-1:],  # pack
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))  # 8 GPUs x 2 images

# AdamW lr 1e-4 (backbone x 0.1), weight decay 1e-4, clipping at 0.1 come from mmdet's DETR;
# 50 epochs with a step at 33 from the release.
train_cfg = dict(max_epochs=50)
param_scheduler = [dict(type='MultiStepLR', begin=0, end=50, by_epoch=True, milestones=[33], gamma=0.1)]
# Published lr at a batch of 16; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
