"""DINO's image statistics and evaluation transform, as a stock transformers image processor.

Copied next to saved DinoModel weights with `modeling_dino.py` (it needs only transformers), and the
one home of the ImageNet mean and std, what dino_hf normalises with where a model names no mean and std of
its own (`dino_hf.models.normalization`).
"""

from transformers import BitImageProcessor
from transformers.image_utils import PILImageResampling

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_image_processor(
    image_size: int = 224, image_mean: tuple = IMAGENET_MEAN, image_std: tuple = IMAGENET_STD
) -> BitImageProcessor:
    """DINO's evaluation transform as a stock transformers image processor.

    Resize the shortest edge to 256 (bicubic), centre-crop 224, scale to [0, 1] and normalise with
    `image_mean` and `image_std`, ImageNet's unless the model was trained on others
    (docs/evaluation.md#evaluation-transform). Other sizes keep the 256 / 224 ratio.
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
        image_mean=list(image_mean),
        image_std=list(image_std),
        do_convert_rgb=True,
    )


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "dino_image_processor"]
