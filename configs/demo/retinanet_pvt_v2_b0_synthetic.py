# RetinaNet-PVTv2-b0 trained from scratch on the synthetic shapes (make demo).
# The model is ../retinanet_pvt_v2_b0.py but for the number of classes, the backbone's
# pretrained weights (none: nothing is downloaded) and the head: the FPN and the head have 128
# channels instead of 256, and the head two convolutions per branch instead of four. The
# head's convolutions were most of a step; at width 128 a step takes half the time (0.36-0.44 s
# against 0.63-0.88 s, on one machine within an hour), and two convolutions take off about a
# sixth more, so the demo stays within minutes on two cores. Data and schedule differ too.
# Data: python -m mmpvt.datasets.synthetic data/synthetic --num-train 1000 --num-val 100 --size 128
# Train: python tools/train.py configs/demo/retinanet_pvt_v2_b0_synthetic.py --amp (tools/demo.sh)
_base_ = ['../retinanet_pvt_v2_b0.py']

data_root = 'data/synthetic/coco/'
metainfo = dict(classes=('circle', 'rectangle', 'triangle'),
                palette=[(220, 20, 60), (0, 130, 230), (250, 170, 30)])
img_scale = (128, 128)  # the generated size: no resizing work per image

width = 128  # FPN and head channels (256 in the zoo's config)
model = dict(backbone=dict(init_cfg=None), neck=dict(out_channels=width),
             bbox_head=dict(num_classes=3, in_channels=width, feat_channels=width,
                            stacked_convs=2))  # per branch (4 in the zoo's config)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# Two CPU cores: the model's own threads use both, so images load in the main process.
train_dataloader = dict(
    batch_size=16, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline,
                 ann_file='annotations/instances_train2017.json', data_prefix=dict(img='train2017/')))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline,
                 ann_file='annotations/instances_val2017.json', data_prefix=dict(img='val2017/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

# Schedule: iterations rather than epochs, so the run's length is known in advance: about
# 10 epochs of the 1000 images. bbox mAP at the zoo's width (256): lr 5e-4 0.235, 1e-3
# 0.27-0.34, 2e-3 behind from the start, each with a cosine over all of 600 iterations; flat
# with a short cosine over 700 iterations: lr 1e-3 0.424, 1.5e-3 0.567 (0.613 with mmpvt's
# fused MLP kernel). At width 128, measured with --amp (bfloat16) on 2 CPU cores at 0.5-0.7 s
# per iteration of 16 images: 700 iterations 0.603, 600 iterations 0.535; 500 iterations at
# lr 2e-3 with a 50-iteration warm-up 0.311. With two convolutions per head branch, 600
# iterations: 0.641 (three runs, 5-6 minutes each for the whole make demo).
max_iters = 600
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=150)
optim_wrapper = dict(optimizer=dict(lr=1.5e-3, weight_decay=1e-4, fused=True),  # fused: one pass per step
                     clip_grad=dict(max_norm=5, norm_type=2))
# Warm-up, a flat learning rate, and a short cosine at the end: the model is still learning
# fast when a cosine over the whole run has already lowered the rate.
anneal_iters = 150
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=max_iters - anneal_iters, end=max_iters,
         T_max=anneal_iters, eta_min=1e-6),
]
default_hooks = dict(
    logger=dict(interval=20, log_metric_by_epoch=False),  # metrics logged at their iteration
    checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False, window_size=20)
auto_scale_lr = dict(base_batch_size=16)  # the lr above is for 1 process x 16 images
# A fixed seed: the same weights at the start and the same batches every run (mmengine draws
# a new seed per run otherwise; runs of an earlier schedule ended 0.07 mAP apart).
randomness = dict(seed=0)
