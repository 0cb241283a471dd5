# Deformable DETR with PVTv2-b2 (beyond the authors' release): mmdet's Deformable DETR and its
# 50-epoch recipe (AdamW lr 2e-4, backbone x 0.1, 16 GPUs x 2 images), stages 2-4 as inputs.
_base_ = 'mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py'

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # replaces the ResNet-50 of mmdet's base
        type='PVTv2',
        arch='b2',
        out_indices=(1, 2, 3),  # strides 8, 16, 32; the fourth level comes from the neck
        drop_path_rate=0.1,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        # The authors' ImageNet weights; train from scratch with
        # --cfg-options model.backbone.init_cfg=None
        init_cfg=dict(type='Pretrained',
                      checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth')),
    neck=dict(in_channels=[128, 320, 512]))
