_base_ = './cascade_mask_rcnn_vitdet_b_100e.py'

model = dict(
    backbone=dict(arch='huge', init_cfg=dict(  # MAE ViT-H, patches 14 -> 16
        checkpoint='https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MAE/mae_pretrain_vit_huge_p14to16.pth')),
    neck=dict(in_channels=[320, 640, 1280, 1280]))
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True, layer_decay_rate=0.9))  # every weight decays
# 75 epochs (25 over the set repeated 3 times), the steps and the warm-up scaled by 3/4
train_dataloader = dict(dataset=dict(times=3))
param_scheduler = [dict(_base_.param_scheduler[0], end=187), _base_.param_scheduler[1]]
