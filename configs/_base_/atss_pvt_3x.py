# ATSS 3x multi-scale with a PVT backbone: the method base, with the PVT family's block wired in.
# A variant sets the backbone's type, arch and checkpoint (and the neck's in_channels for b0).
_base_ = ['./atss_3x.py', './pvt.py']

model = dict(backbone=_base_.pvt.backbone, neck=dict(in_channels=_base_.pvt.in_channels))
