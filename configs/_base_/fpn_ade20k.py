# Semantic FPN on ADE20K, 40k iterations, the PVT papers' recipe, for any mmpvt backbone.
# A config adds a family's backbone block (./fpn_pvt_ade20k.py).
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_40k.py'
]

custom_imports = dict(imports=['mmpvt'], allow_failed_imports=False)

crop_size = (512, 512)
model = dict(
    # Training pads to the 512x512 crop; testing (short side 512, long side at most 2048,
    # kept ratio) pads to a multiple of 32.
    data_preprocessor=dict(size=crop_size, test_cfg=dict(size_divisor=32)),
    pretrained=None,  # the base's ResNet weights; the backbone's init_cfg loads its own
    decode_head=dict(num_classes=150))

optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=1e-4))
# Poly decay (power 0.9) to zero over 40k iterations.
param_scheduler = [dict(type='PolyLR', power=0.9, eta_min=0.0, begin=0, end=40000, by_epoch=False)]

train_dataloader = dict(batch_size=4)  # 8 GPUs x 4 images
# Published lr at a batch of 32; other GPU counts: --auto-scale-lr
auto_scale_lr = dict(enable=False, base_batch_size=32)
