_base_ = './mask_rcnn_t2t_vit_14.py'

# Transformer token layers (T2T-ViT_t-14, 81.7% top-1); the rest as T2T-ViT-14.
model = dict(backbone=dict(arch='t_14', init_cfg=dict(
    checkpoint='https://github.com/yitu-opensource/T2T-ViT/releases/download/main/81.7_T2T_ViTt_14.pth.tar')))
