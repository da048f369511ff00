"""DINO's image statistics and evaluation transform, as a stock transformers image processor.

Copied next to saved DinoModel weights with `modeling_dino.py` (it needs only transformers), and the
one home of the ImageNet mean and std that every transform of dino_hf normalises with.
"""

from transformers import BitImageProcessor
from transformers.image_utils import PILImageResampling

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_image_processor(image_size: int = 224) -> BitImageProcessor:
    """DINO's evaluation transform as a stock transformers image processor.

    Resize the shortest edge to 256 (bicubic), centre-crop 224, scale to [0, 1] and normalise with the
    ImageNet mean and std (docs/evaluation.md#evaluation-transform). Other sizes keep the 256 / 224 ratio.
    """
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": round(image_size * 256 / 224)},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "dino_image_processor"]
