_base_ = './cascade_mask_rcnn_mvitv2_t_3x.py'

model = dict(backbone=dict(
    arch='base',  # drop path 0.4: MViTv2-B's in the variant table
    init_cfg=dict(checkpoint='https://dl.fbaipublicfiles.com/mvit/mvitv2_models/MViTv2_B_in1k.pyth')))
