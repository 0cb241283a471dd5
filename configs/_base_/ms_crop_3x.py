# The 3x multi-scale recipe of PVTv2's Mask R-CNN, Cascade Mask R-CNN, ATSS and GFL results.
# A method's base puts it next to mmdet's 1x config of the method and applies it:
#     _base_ = ['mmdet::atss/atss_r50_fpn_1x_coco.py', './ms_crop_3x.py']
#     train_pipeline = [*_base_.train_pipeline[:2],  # load
#                       *_base_.ms_crop_3x.augmentation,
#                       *_base_.train_pipeline[-1:]]  # pack
# It is one key, so that it merges beside any mmdet base without a clash.
ms_crop_3x = dict(
    # The DETR / Sparse R-CNN augmentation: flip, then either a multi-scale resize (short side
    # 480 to 800 in steps of 32) or a resize, a random crop and the same multi-scale resize.
    augmentation=[
        dict(type='RandomFlip', prob=0.5),
        dict(
            type='RandomChoice',
            transforms=[
                [
                    dict(type='RandomChoiceResize', scales=[(s, 1333) for s in range(480, 801, 32)],
                         keep_ratio=True),
                ],
                [
                    dict(type='RandomChoiceResize', scales=[(400, 1333), (500, 1333), (600, 1333)],
                         keep_ratio=True),
                    dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
                         allow_negative_crop=True),
                    dict(type='RandomChoiceResize', scales=[(s, 1333) for s in range(480, 801, 32)],
                         keep_ratio=True),
                ],
            ]),
    ],
    max_epochs=36,
    param_scheduler=[
        dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
        dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
    ],
    optim_wrapper=dict(
        type='AmpOptimWrapper',  # mixed precision
        optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
        # No weight decay on LayerNorms (every norm of the backbone is named *norm*) and on
        # position embeddings.
        paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.), 'pos_embed': dict(decay_mult=0.)})),
)
