# The MViTv2 paper's MViTv1-T baseline (Table 4: 45.9 box / 42.1 mask AP, 46M parameters):
# MViTv2-T's layout in v1's design. No ImageNet weights for it were released: the backbone starts
# from scratch unless init_cfg names the user's own pre-training (the paper's starts from ImageNet).
_base_ = './mask_rcnn_mvitv1_s_3x.py'

model = dict(backbone=dict(arch='tiny', init_cfg=None))
