_base_ = './cascade_mask_rcnn_mvitv2_t_3x.py'

model = dict(backbone=dict(
    arch='small',
    init_cfg=dict(checkpoint='https://dl.fbaipublicfiles.com/mvit/mvitv2_models/MViTv2_S_in1k.pyth')))
