# The MViT v1 family's block (Fan et al., "Multiscale Vision Transformers", ICCV 2021), written
# once for every method; a config puts it beside an mmdet or mmseg base and wires the parts:
#     _base_ = ['./_base_/retinanet.py', './_base_/mvitv1.py']
#     model = dict(backbone=_base_.mvitv1.backbone, neck=dict(in_channels=_base_.mvitv1.in_channels))
# MViT-B-16 with the authors' ImageNet-1k weights. The variant's defaults (drop path 0.1 for B-16,
# 0.3 for B-24; the 224 position table, 320 for B-24-wide) come from its table in
# mmpvt/models/mvit.py.
mvitv1 = dict(
    backbone=dict(
        _delete_=True,  # replaces the backbone of mmdet's or mmseg's base (ResNet-50)
        type='MViTv1',
        arch='b16',
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        # The B-16 ImageNet-1k weights as PyTorchVideo's hub serves them (a direct download; the
        # same model as PySlowFast's zoo file, which loads too); train from scratch with
        # --cfg-options model.backbone.init_cfg=None
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/imagenet/MVIT_B_16_f292487636.pyth')),
    # v1 widens in the last block of each stage: its maps have the next stage's width.
    in_channels=[192, 384, 768, 768],
    # AdamW with layer-wise lr decay (no paper gives a v1 detection recipe; 0.75 over 16 blocks
    # is the usual fine-tuning rate of ViT-B-sized models): block i's lr is
    # 0.75 ** (17 - (i + 1)) of the base lr, the embeddings' 0.75 ** 17; no weight decay on norms,
    # the position table and the class token.
    optim_wrapper=dict(
        constructor='LayerDecayOptimWrapperConstructor',
        paramwise_cfg=dict(layer_decay_rate=0.75, norm_decay_mult=0.,
                           no_decay_names=('pos_embed', 'cls_token'))),
)
