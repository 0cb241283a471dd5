"""mmpvt's inference API: a detector or segmentor from its config with a checkpoint that fits
it, and predictions on one's own images (what ``tools/infer.py`` runs).

    from mmpvt.apis import ImagePredictor, build_model
"""
from .inference import ImagePredictor, detection_record, find_images, output_names, segmentation_record
from .model import build_model, check_checkpoint_fits, load_model_checkpoint

__all__ = ['ImagePredictor', 'build_model', 'check_checkpoint_fits', 'detection_record', 'find_images',
           'load_model_checkpoint', 'output_names', 'segmentation_record']
