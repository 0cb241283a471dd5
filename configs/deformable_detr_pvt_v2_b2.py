# Deformable DETR with PVTv2-b2 (beyond the authors' release): mmdet's Deformable DETR and its
# 50-epoch recipe (AdamW lr 2e-4, backbone x 0.1, 16 GPUs x 2 images), stages 2-4 as inputs.
_base_ = ['mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py', './_base_/pvt.py']

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

model = dict(
    # PVTv2-b2, strides 8, 16, 32; the fourth level comes from the neck
    backbone=dict(_base_.pvt.backbone, out_indices=(1, 2, 3)),
    neck=dict(in_channels=_base_.pvt.in_channels[1:]))
