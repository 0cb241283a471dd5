_base_ = ['./_base_/fpn_ade20k.py', './_base_/vitdet.py']

# Relative-position tables of the global blocks sized for the 512x512 crops.
model = dict(backbone=dict(_base_.vitdet.backbone, img_size=512),
             neck=dict(in_channels=_base_.vitdet.in_channels))
optim_wrapper = dict(constructor='LayerDecayOptimWrapperConstructor',
                     paramwise_cfg=_base_.vitdet.paramwise_cfg)
