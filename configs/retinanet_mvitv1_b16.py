_base_ = ['./_base_/retinanet.py', './_base_/mvitv1.py']

# FPN from stride 8, as RetinaNet's: the stride-4 level (and its output norm) is not built.
model = dict(backbone=dict(_base_.mvitv1.backbone, out_indices=(1, 2, 3)),
             neck=dict(in_channels=_base_.mvitv1.in_channels[1:], start_level=0))
optim_wrapper = _base_.mvitv1.optim_wrapper  # merged into the base's AdamW
