# Mask R-CNN 1x, the recipe of the PVT / PVTv2 papers, for any mmpvt backbone: mmdet's Mask
# R-CNN with AdamW. A config adds a family's backbone block (./mask_rcnn_pvt.py); the big
# models (PVT-Large, PVTv2-b4/b5) also take lr / 1.4 with 1 image per GPU.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

# AdamW instead of the base's SGD; 12 epochs, steps at 8 and 11 and the 500-iteration
# linear warm-up (ratio 0.001) come from mmdet's schedule_1x as published.
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=1e-4))

train_dataloader = dict(batch_size=2)  # 8 GPUs x 2 images
# Published lr at a batch of 16; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
