# UperNet with PVTv2-b2 on ADE20K (beyond the authors' release): mmseg's Swin-T UperNet recipe,
# 160k iterations, AdamW lr 6e-5, weight decay 0.01 (none on norms), 1500-iteration warm-up,
# linear decay, 512x512 crops, 8 GPUs x 2 images.
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # replaces the Swin-T of mmseg's base
        type='PVTv2',
        arch='b2',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        # The authors' ImageNet weights; train from scratch with
        # --cfg-options model.backbone.init_cfg=None
        init_cfg=dict(type='Pretrained',
                      checkpoint='https://github.com/whai362/PVT/releases/download/v2/pvt_v2_b2.pth')),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))  # stage 3

# Published lr at a batch of 16; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=16)
