# UperNet with PVTv2-b2 on ADE20K (beyond the authors' release): mmseg's Swin-T UperNet recipe,
# 160k iterations, AdamW lr 6e-5, weight decay 0.01 (none on norms), 1500-iteration warm-up,
# linear decay, 512x512 crops, 8 GPUs x 2 images.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    './_base_/pvt.py'
]

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

model = dict(
    backbone=_base_.pvt.backbone,  # PVTv2-b2
    decode_head=dict(in_channels=_base_.pvt.in_channels),
    auxiliary_head=dict(in_channels=_base_.pvt.in_channels[2]))  # stage 3

# Published lr at a batch of 16; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
