_base_ = './_base_/mask_rcnn_pvt.py'

model = dict(backbone=dict(
    type='PVTv2', arch='b4',
    init_cfg=dict(checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b4.pth')))
# Big models: 1 image per GPU and lr / 1.4, as published (8 GPUs x 1 image)
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=2e-4 / 1.4))
auto_scale_lr = dict(base_batch_size=8)
