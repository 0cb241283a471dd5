# detectron2's MViTv2 Cascade Mask R-CNN (projects/MViTv2), the model only: mmdet's Cascade Mask
# R-CNN with the MViTv2 block, a 2-conv RPN head, 4conv1fc box heads and a mask head normalised by
# SyncBN (detectron2's NaiveSyncBatchNorm). A config adds data and schedule: multi-scale 36 epochs
# (../cascade_mask_rcnn_mvitv2_t_3x.py) or large-scale jitter (./cascade_mask_rcnn_mvitv2_lsj.py).
_base_ = ['mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py', './mvitv2.py']

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

model = dict(
    backbone=_base_.mvitv2.backbone,
    neck=dict(in_channels=_base_.mvitv2.in_channels),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        # each of the three stages keeps its IoU threshold and box-delta statistics
        bbox_head=[
            dict(head, type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                 norm_cfg=dict(type='SyncBN', requires_grad=True))
            for head in _base_.model.roi_head.bbox_head
        ],
        mask_head=dict(norm_cfg=dict(type='SyncBN', requires_grad=True))))
