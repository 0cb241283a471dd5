# The T2T-ViT family's block (Tokens-to-Token ViT, Yuan et al. 2021, with the simple pyramid
# of ViTDet), written once for every method. It is one key, so that it merges beside any mmdet
# or mmseg base without a clash; a config puts the two side by side and wires the parts it needs:
#     _base_ = ['./_base_/mask_rcnn.py', './_base_/t2t_vit.py']
#     model = dict(backbone=_base_.t2t_vit.backbone, neck=dict(in_channels=_base_.t2t_vit.in_channels))
#     optim_wrapper = _base_.t2t_vit.optim_wrapper
# T2T-ViT-14 (performer token layers); ../retinanet_t2t_vit_t_14.py and its siblings change the
# arch to 't_14' (transformer token layers) and the checkpoint. No detection or segmentation
# result of T2T-ViT is published: these configs apply the zoo's 1x / 40k recipes.
t2t_vit = dict(
    backbone=dict(
        _delete_=True,  # replaces the backbone of mmdet's or mmseg's base (ResNet-50)
        type='T2TViT',
        arch='14',
        # The pre-training grid (14x14 tokens at 224). Other inputs get the position table
        # resized to their grid at run time, bicubically with the class row kept, as the
        # authors transfer it to other sizes.
        img_size=224,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,  # drop path 0.1, the authors' training default: the variant table's
        with_cp=False,
        # The authors' ImageNet-1k weights (T2T-ViT-14, 81.5% top-1; the EMA weights are the
        # ones loaded); train from scratch with --cfg-options model.backbone.init_cfg=None
        init_cfg=dict(
            type='Pretrained',
            checkpoint='https://github.com/yitu-opensource/T2T-ViT/releases/download/main/'
            '81.5_T2T_ViT_14.pth.tar')),
    # The backbone's maps at strides 4, 8, 16, 32 (C/4, C/2, C, C with C = 384 for '14' and 't_14').
    in_channels=[96, 192, 384, 384],
    # The zoo's optimizer (each method base's AdamW) with layer-wise lr decay: block i of the
    # L = 14 scaled by rate ** (L - i), the token-to-token module and the class token by
    # rate ** (L + 1), what follows the blocks (final norm, pyramid, neck, heads) by 1.
    # Not a published recipe: 0.75 ** 15 = 0.013 gives the embeddings about the scale ViTDet-B's
    # 0.7 gives them over its 12 blocks (0.7 ** 13 = 0.010). No weight decay on norms and the
    # class token, as ViTDet-B exempts norms and its learned position embedding (T2T-ViT's
    # sinusoid table is a fixed buffer, which no optimizer sees).
    optim_wrapper=dict(
        constructor='LayerDecayOptimWrapperConstructor',
        paramwise_cfg=dict(layer_decay_rate=0.75, norm_decay_mult=0., no_decay_names=('cls_token', ))),
)
