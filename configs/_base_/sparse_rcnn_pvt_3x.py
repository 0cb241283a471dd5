# Sparse R-CNN 3x with a PVTv2 backbone, as in the PVTv2 paper: mmdet's own recipe with 300
# proposals, DETR-style crop and 480-800 multi-scale augmentation, 36 epochs, AdamW lr 2.5e-5,
# weight decay 1e-4, gradient clipping at 1 (no mixed precision, as released).
# A variant sets the backbone's arch and checkpoint.
_base_ = 'mmdet::sparse_rcnn/sparse-rcnn_r50_fpn_300-proposals_crop-ms-480-800-3x_coco.py'

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
    neck=dict(in_channels=[64, 128, 320, 512]))  # all four stages, no extra level

optim_wrapper = dict(optimizer=dict(lr=2.5e-5, weight_decay=1e-4))
train_dataloader = dict(batch_size=2)  # 8 GPUs x 2 images
# Published lr at a batch of 16; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
