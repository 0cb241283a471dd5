# Mask R-CNN 1x with a PVT backbone: the recipe of the PVT / PVTv2 papers.
# A variant sets the backbone's type, arch and checkpoint and the neck's in_channels;
# the big models (PVT-Large, PVTv2-b4/b5) also lr / 1.4 with 1 image per GPU.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

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
    neck=dict(in_channels=[64, 128, 320, 512]))  # stage widths of all but PVTv2-b0

# AdamW instead of the base's SGD; 12 epochs, steps at 8 and 11 and the 500-iteration
# linear warm-up (ratio 0.001) come from mmdet's schedule_1x as published.
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=1e-4))

train_dataloader = dict(batch_size=2)  # 8 GPUs x 2 images
# Published lr at a batch of 16; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
