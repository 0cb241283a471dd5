# Semantic FPN-PVTv2-b0 trained from scratch on the synthetic shapes' ADE-style label maps.
# The model is ../fpn_pvt_v2_b0_ade20k.py unchanged but for the number of classes, the crop
# size and the backbone's pretrained weights (none: nothing is downloaded); only data and
# schedule differ.
# Data: python -m mmpvt.datasets.synthetic data/synthetic --num-train 1000 --num-val 100 --size 128
_base_ = ['../fpn_pvt_v2_b0_ade20k.py']

data_root = 'data/synthetic/ade/ADEChallengeData2016'
# ADE20KDataset accepts only subsets of ADE's 150 classes as metainfo, so the demo reads
# the same layout (images/*.jpg, annotations/*.png, 0 = no class) with the base class.
metainfo = dict(classes=('circle', 'rectangle', 'triangle'),
                palette=[(220, 20, 60), (0, 130, 230), (250, 170, 30)])
dataset_type = 'BaseSegDataset'
# mmpvt.datasets.transforms: CheckSegLabels, which names a label PNG holding values that are no class.
custom_imports = dict(imports=['mmpvt', 'mmpvt.datasets.transforms'], allow_failed_imports=False)
crop_size = (128, 128)  # the generated size

model = dict(
    backbone=dict(init_cfg=None),
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=3))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=len(metainfo['classes'])),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='CheckSegLabels', num_classes=len(metainfo['classes'])),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
                 seg_map_suffix='.png', reduce_zero_label=True, pipeline=train_pipeline,
                 data_prefix=dict(img_path='images/training', seg_map_path='annotations/training')))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(type=dataset_type, data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
                 seg_map_suffix='.png', reduce_zero_label=True, pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation')))
test_dataloader = val_dataloader

# Schedule: iterations, as in the RetinaNet demo; poly decay as in the base.
max_iters = 1000
train_cfg = dict(max_iters=max_iters, val_interval=250)
optim_wrapper = dict(optimizer=dict(lr=4e-4, weight_decay=1e-4, fused=True),
                     clip_grad=dict(_delete_=True, max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', power=0.9, eta_min=0.0, by_epoch=False, begin=50, end=max_iters),
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
auto_scale_lr = dict(base_batch_size=8)  # the lr above is for 1 process x 8 images
