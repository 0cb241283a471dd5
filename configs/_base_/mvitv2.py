# The MViTv2 family's block (Li et al., CVPR 2022, the detection backbone of detectron2's
# projects/MViTv2), written once for every method. It is one key, so that it merges beside any
# mmdet or mmseg base without a clash; a config puts the two side by side and wires the parts it
# needs:
#     _base_ = ['./_base_/retinanet.py', './_base_/mvitv2.py']
#     model = dict(backbone=_base_.mvitv2.backbone, neck=dict(in_channels=_base_.mvitv2.in_channels))
# MViTv2-T with its ImageNet-1k weights; S / B / L / H change arch and checkpoint (L and H also
# the neck's in_channels, H activation checkpointing): see ../cascade_mask_rcnn_mvitv2_s_3x.py. The
# variant's defaults (drop path: detectron2's T 0.2, S 0.2, B 0.4, L 0.5, H 0.6; stage 1's 56-token
# attention window, halved per stage) come from its table in mmpvt/models/mvit.py.
mvitv2 = dict(
    backbone=dict(
        _delete_=True,  # replaces the backbone of mmdet's or mmseg's base (ResNet-50)
        type='MViTv2',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        # The authors' ImageNet-1k weights (official release, as detectron2 loads them);
        # train from scratch with --cfg-options model.backbone.init_cfg=None
        init_cfg=dict(type='Pretrained',
                      checkpoint='https://dl.fbaipublicfiles.com/mvit/mvitv2_models/MViTv2_T_in1k.pyth')),
    # The stage widths of T, S and B (L: 144, 288, 576, 1152; H: 192, 384, 768, 1536).
    in_channels=[96, 192, 384, 768],
    # detectron2's COCO recipe (projects/MViTv2/configs, trained at a batch of 64): AdamW with
    # mixed precision and no layer decay, 36 epochs (its 67,500 iterations).
    recipe=dict(
        optim_wrapper=dict(
            _delete_=True,  # replaces the base's wrapper whole (SGD, or another recipe's keys)
            type='AmpOptimWrapper',
            optimizer=dict(type='AdamW', lr=1.6e-4, betas=(0.9, 0.999), weight_decay=0.1),
            # No weight decay on any norm layer (the backbone's LayerNorms and the heads' SyncBN,
            # detectron2's weight_decay_norm=0), on the relative-position tables, and on
            # position embeddings (none in the detection model; listed as detectron2 lists it).
            paramwise_cfg=dict(
                norm_decay_mult=0.,
                custom_keys={
                    'pos_embed': dict(decay_mult=0.),
                    'rel_pos_h': dict(decay_mult=0.),
                    'rel_pos_w': dict(decay_mult=0.),
                })),
        param_scheduler=[
            # Linear warm-up from 0.001 over detectron2's 250 iterations (at the batch of 64).
            dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=250),
            # lr x0.1 where detectron2 steps, at 52,500 and 62,500 of its 67,500 iterations:
            # epochs 28 and 33 1/3 of 36. Each step is a scheduler that begins there and decays
            # at once (its milestone 0 counts from its begin); converted to iterations, the
            # fractional epoch falls on the right iteration at any batch size.
            *[
                dict(type='MultiStepLR', by_epoch=True, convert_to_iter_based=True, begin=36 * step / 67500,
                     end=36, milestones=[0], gamma=0.1)
                for step in (52500, 62500)
            ],
        ],
    ),
)
