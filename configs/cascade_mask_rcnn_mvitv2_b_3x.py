_base_ = './cascade_mask_rcnn_mvitv2_t_3x.py'

model = dict(backbone=dict(
    arch='base', drop_path_rate=0.4,
    init_cfg=dict(checkpoint='https://dl.fbaipublicfiles.com/mvit/mvitv2_models/MViTv2_B_in1k.pyth')))
