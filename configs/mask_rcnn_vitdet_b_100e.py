# ViTDet-B Mask R-CNN, the paper's recipe: LSJ at 1024, 100 epochs, MAE weights, batch 64.
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::common/lsj-100e_coco-instance.py',
          './_base_/vitdet.py']
custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)
model = dict(backbone=_base_.vitdet.backbone, **_base_.vitdet.lsj.model,
             roi_head=dict(bbox_head=_base_.vitdet.lsj.bbox_head, mask_head=_base_.vitdet.lsj.mask_head))
val_dataloader = test_dataloader = dict(dataset=dict(pipeline=_base_.vitdet.lsj.test_pipeline))
optim_wrapper = _base_.vitdet.lsj.optim_wrapper
param_scheduler = _base_.vitdet.lsj.param_scheduler
