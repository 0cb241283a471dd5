# Sparse R-CNN 3x, as in the PVTv2 paper, for any mmpvt backbone: mmdet's own recipe with 300
# proposals, DETR-style crop and 480-800 multi-scale augmentation, 36 epochs, AdamW lr 2.5e-5,
# weight decay 1e-4, gradient clipping at 1 (no mixed precision, as released). Its FPN takes
# all four levels, no extra one. A config adds a family's backbone block (./sparse_rcnn_pvt_3x.py).
_base_ = 'mmdet::sparse_rcnn/sparse-rcnn_r50_fpn_300-proposals_crop-ms-480-800-3x_coco.py'

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

optim_wrapper = dict(optimizer=dict(lr=2.5e-5, weight_decay=1e-4))
train_dataloader = dict(batch_size=2)  # 8 GPUs x 2 images
# Published lr at a batch of 16; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
