_base_ = ['./_base_/retinanet.py', './_base_/vitdet.py']

# FPN from stride 8, as RetinaNet's: the stride-4 level is not built (no unused parameters).
model = dict(backbone=dict(_base_.vitdet.backbone, out_indices=(1, 2, 3)),
             neck=dict(in_channels=_base_.vitdet.in_channels[1:], start_level=0))
optim_wrapper = dict(constructor='LayerDecayOptimWrapperConstructor',
                     paramwise_cfg=_base_.vitdet.paramwise_cfg)
