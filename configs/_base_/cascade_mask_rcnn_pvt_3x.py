# Cascade Mask R-CNN 3x multi-scale with a PVTv2 backbone, as in the PVTv2 paper: mmdet's
# Cascade Mask R-CNN with the 4conv1fc box heads and GIoU loss of the release, the 3x recipe.
# A variant sets the backbone's arch and checkpoint.
_base_ = ['mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py', './ms_crop_3x.py']

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
    neck=dict(in_channels=[64, 128, 320, 512]),
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
