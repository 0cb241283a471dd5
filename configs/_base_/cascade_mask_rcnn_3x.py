# Cascade Mask R-CNN 3x multi-scale, as in the PVTv2 paper, for any mmpvt backbone: mmdet's
# Cascade Mask R-CNN with the 4conv1fc box heads and GIoU loss of the release, the 3x recipe.
# A config adds a family's backbone block (./cascade_mask_rcnn_pvt_3x.py).
_base_ = ['mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py', './ms_crop_3x.py']

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

model = dict(
    roi_head=dict(bbox_head=[
        dict(
            type='ConvFCBBoxHead',
            num_shared_convs=4,
            num_shared_fcs=1,
            in_channels=256,
            conv_out_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            num_classes=80,
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
            reg_class_agnostic=False,
            reg_decoded_bbox=True,  # GIoU on decoded boxes
            norm_cfg=dict(type='SyncBN', requires_grad=True),
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='GIoULoss', loss_weight=10.0))
        # one head per stage, each with tighter box-delta statistics
        for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])
    ]))

train_pipeline = [
    *_base_.train_pipeline[:2],  # load the image, boxes and masks
    *_base_.ms_crop_3x.augmentation,
    *_base_.train_pipeline[-1:],  # pack
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))  # 8 GPUs x 2 images
train_cfg = dict(max_epochs=_base_.ms_crop_3x.max_epochs)
param_scheduler = _base_.ms_crop_3x.param_scheduler
optim_wrapper = _base_.ms_crop_3x.optim_wrapper
# Published lr at a batch of 16; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
