# The PVT family's backbone block, written once for every method. It is one key, so that it
# merges beside any method base without a clash; a config puts the two side by side and wires
# the block in (the <method>_pvt*.py bases here do exactly that):
#     _base_ = ['./retinanet.py', './pvt.py']
#     model = dict(backbone=_base_.pvt.backbone, neck=dict(in_channels=_base_.pvt.in_channels))
# A variant then names its type, arch and checkpoint: see ../retinanet_pvt_v2_b4.py.
pvt = dict(
    backbone=dict(
        _delete_=True,  # replaces the backbone of mmdet's or mmseg's base (ResNet-50, Swin-T)
        type='PVTv2',
        arch='b2',
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,  # the variant's drop path (0.1) comes from its table in mmpvt/models/pvt.py
        norm_eval=False,
        with_cp=False,
        # The authors' ImageNet weights; train from scratch with
        # --cfg-options model.backbone.init_cfg=None
        init_cfg=dict(type='Pretrained',
                      checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth')),
    # The stage widths of every variant but PVTv2-b0 (32, 64, 160, 256).
    in_channels=[64, 128, 320, 512],
)
