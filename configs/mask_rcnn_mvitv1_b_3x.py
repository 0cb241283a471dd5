# The MViTv2 paper's MViTv1-B baseline (Table 4: 48.8 box / 44.2 mask AP, 73M parameters): MViT-B-24,
# with MViTv2-B's drop path (0.4). No ImageNet weights for B-24 were released: the backbone starts
# from scratch unless init_cfg names the user's own pre-training (the paper's starts from ImageNet).
_base_ = './mask_rcnn_mvitv1_s_3x.py'

model = dict(backbone=dict(arch='b24', drop_path_rate=0.4, init_cfg=None))
