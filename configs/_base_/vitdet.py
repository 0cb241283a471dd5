# The ViTDet family's block (plain ViT + simple feature pyramid, Li et al. 2022), written once
# for every method. It is one key, so that it merges beside any mmdet or mmseg base without a
# clash; a config puts the two side by side and wires the parts it needs:
#     _base_ = ['./_base_/retinanet.py', './_base_/vitdet.py']
#     model = dict(backbone=_base_.vitdet.backbone, neck=dict(in_channels=_base_.vitdet.in_channels))
# ViT-B from MAE pre-training; the L / H detectors change arch, checkpoint, the neck's in_channels
# and the layer decay (see ../cascade_mask_rcnn_vitdet_l_100e.py). The variant's defaults (drop path:
# the paper's B 0.1, L 0.4, H 0.5; 14x14 attention windows) come from its table in
# mmpvt/models/vitdet.py.
vitdet = dict(
    backbone=dict(
        _delete_=True,  # replaces the backbone of mmdet's or mmseg's base (ResNet-50)
        type='ViTDet',
        arch='base',
        img_size=1024,  # sizes the global blocks' relative-position tables (resized elsewhere)
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        # MAE ImageNet-1k pre-training (relative-position tables absent: they start at zero);
        # train from scratch with --cfg-options model.backbone.init_cfg=None
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MAE/'
            'mae_pretrain_vit_base.pth')),
    # The backbone's maps at strides 4, 8, 16, 32 for ViT-B (C/4, C/2, C, C with C = 768).
    in_channels=[192, 384, 768, 768],
    # Fine-tuning as in the paper: layer-wise lr decay (block i of L scaled by
    # rate ** (L - i), the embeddings by rate ** (L + 1), neck and heads by 1), no weight decay
    # on norms and the position embedding (B and L; ViT-H's recipe exempts nothing).
    paramwise_cfg=dict(layer_decay_rate=0.7, norm_decay_mult=0., no_decay_names=('pos_embed', )),
    # The paper's Mask R-CNN / Cascade recipe beside mmdet's LSJ base
    # (mmdet::common/lsj-100e_coco-instance.py: flip, resize 0.1-2.0 of 1024, crop 1024;
    # 25 epochs over the training set repeated 4 times = 100 epochs, lr x0.1 at 88 and 96).
    lsj=dict(
        model=dict(
            # Training images padded to the 1024 square, testing to a multiple of 32.
            data_preprocessor=dict(
                pad_size_divisor=32,
                batch_augments=[dict(type='BatchFixedSizePad', size=(1024, 1024), pad_mask=True)]),
            neck=dict(_delete_=True, type='ViTDetNeck', in_channels=[192, 384, 768, 768],
                      out_channels=256, num_outs=5),
            rpn_head=dict(num_convs=2)),
        # 4conv1fc box heads and the mask head normalised by channel LayerNorm, as the paper's.
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                       norm_cfg=dict(type='LayerNorm2d', eps=1e-6, requires_grad=True)),
        mask_head=dict(norm_cfg=dict(type='LayerNorm2d', eps=1e-6, requires_grad=True)),
        # Testing at the training scale: long side 1024.
        test_pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(1024, 1024), keep_ratio=True),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='PackDetInputs',
                 meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
        ],
        optim_wrapper=dict(
            type='AmpOptimWrapper',  # mixed precision
            constructor='LayerDecayOptimWrapperConstructor',
            optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
            paramwise_cfg=dict(layer_decay_rate=0.7, norm_decay_mult=0., no_decay_names=('pos_embed', ))),
        # Warm-up over 250 iterations from 0.001 (at the batch of 64), then the base's steps.
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=250),
            dict(type='MultiStepLR', begin=0, end=25, by_epoch=True, milestones=[22, 24], gamma=0.1),
        ],
    ),
)
