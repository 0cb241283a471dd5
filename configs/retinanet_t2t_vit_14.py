_base_ = ['./_base_/retinanet.py', './_base_/t2t_vit.py']

# FPN from stride 8, as RetinaNet's: the stride-4 level is not built (no unused parameters).
model = dict(backbone=dict(_base_.t2t_vit.backbone, out_indices=(1, 2, 3)),
             neck=dict(in_channels=_base_.t2t_vit.in_channels[1:], start_level=0))
optim_wrapper = _base_.t2t_vit.optim_wrapper
