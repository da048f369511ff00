import itertools
import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter, ImageOps

from dino_hf.augment.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropParams,
    MultiCropTransform,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def smooth_image(height, width, seed=0):
    """uint8 (3, H, W): a smooth random image (an upsampled coarse noise), like natural images."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=g)
    return (torch.nn.functional.interpolate(coarse, (height, width), mode="bilinear")[0] * 255).round().to(torch.uint8)


def unnormalise(x):
    return x * STD + MEAN


def no_aug(**overrides):
    options = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    options.update(overrides)
    return MultiCropTransform(**options)


def test_default_output_shapes_for_tensor_and_pil_input():
    image = smooth_image(120, 100)
    transform = MultiCropTransform()
    for source in (image, Image.fromarray(image.permute(1, 2, 0).numpy())):
        crops = transform(source, torch.Generator().manual_seed(0))
        assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
        assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)


def test_same_generator_seed_gives_same_crops_and_other_seeds_differ():
    image = smooth_image(80, 90)
    transform = MultiCropTransform(64, 32, local_crops_number=3)
    a = transform(image, torch.Generator().manual_seed(5))
    b = transform(image, torch.Generator().manual_seed(5))
    c = transform(image, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_sampled_rates_and_ranges_match_the_paper():
    transform = MultiCropTransform()
    generator = torch.Generator().manual_seed(0)
    samples = [transform.sample_params(300, 400, generator) for _ in range(3000)]
    crops = [p for params in samples for p in params]

    def rate(values):
        return sum(values) / len(values)

    assert rate([p.flip for p in crops]) == pytest.approx(0.5, abs=0.02)
    assert rate([p.jitter is not None for p in crops]) == pytest.approx(0.8, abs=0.02)
    assert rate([p.grayscale for p in crops]) == pytest.approx(0.2, abs=0.02)
    assert rate([s[0].blur_sigma is not None for s in samples]) == 1.0
    assert rate([s[1].blur_sigma is not None for s in samples]) == pytest.approx(0.1, abs=0.02)
    assert rate([p.blur_sigma is not None for s in samples for p in s[2:]]) == pytest.approx(0.5, abs=0.02)
    assert rate([s[1].solarize for s in samples]) == pytest.approx(0.2, abs=0.02)
    assert not any(p.solarize for s in samples for i, p in enumerate(s) if i != 1)
    sigmas = [p.blur_sigma for p in crops if p.blur_sigma is not None]
    assert 0.1 <= min(sigmas) < 0.15 and 1.95 < max(sigmas) <= 2.0
    jitters = [p.jitter for p in crops if p.jitter is not None]
    for index, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)], start=1):
        values = [j[index] for j in jitters]
        assert low <= min(values) < low + 0.01 and high - 0.01 < max(values) <= high
    assert {j[0] for j in jitters} == set(itertools.permutations(range(4)))
    for index, (low, high) in ((0, (0.4, 1.0)), (1, (0.4, 1.0)), (5, (0.05, 0.4))):
        areas = [s[index].height * s[index].width / (300 * 400) for s in samples]
        ratios = [s[index].width / s[index].height for s in samples]
        assert low - 0.01 <= min(areas) and max(areas) <= high + 0.01
        assert min(ratios) >= 3 / 4 - 0.02 and max(ratios) <= 4 / 3 + 0.02
        assert all(
            0 <= s[index].top <= 300 - s[index].height and 0 <= s[index].left <= 400 - s[index].width for s in samples
        )


def test_without_augmentation_a_full_crop_is_the_normalised_image():
    image = smooth_image(48, 48)
    transform = no_aug(
        global_crops_size=48,
        local_crops_size=48,
        global_crops_scale=(1, 1),
        local_crops_scale=(1, 1),
        ratio=(1, 1),
        local_crops_number=1,
    )
    crops = transform(image, torch.Generator().manual_seed(0))
    expected = (image.float() / 255 - MEAN) / STD
    for crop in crops:
        torch.testing.assert_close(crop, expected, atol=1e-5, rtol=0)


def full_crop_params(**overrides):
    options = dict(
        top=0, left=0, height=32, width=32, flip=False, jitter=None, grayscale=False, blur_sigma=None, solarize=False
    )
    options.update(overrides)
    return CropParams(**options)


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(flip=True), lambda x: x.flip(-1)),
        (dict(grayscale=True), lambda x: (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, -1, -1)),
        (dict(solarize=True), lambda x: torch.where(x >= 128 / 255, 1 - x, x)),
        (dict(blur_sigma=1.5), lambda x: TF.gaussian_blur(x, [11, 11], [1.5, 1.5])),
        (
            dict(jitter=((3, 0, 2, 1), 1.3, 0.7, 1.1, 0.05)),
            lambda x: TF.adjust_contrast(
                TF.adjust_saturation(TF.adjust_brightness(TF.adjust_hue(x, 0.05), 1.3), 1.1), 0.7
            ),
        ),
    ],
)
def test_each_operation_with_fixed_params_matches_torchvision(change, expected):
    image = smooth_image(32, 32)
    transform = no_aug(global_crops_size=32, local_crops_size=32)
    crop = unnormalise(transform.augment_crop(image, full_crop_params(**change), 32))
    torch.testing.assert_close(crop, expected(image.float() / 255), atol=1e-4, rtol=0)


def test_colour_ops_match_torchvision_on_random_pixels():
    # atol 1e-4: torchvision's luma weight for red is 0.2989, PIL's (and ours) 0.299.
    x = torch.rand(3, 40, 50)
    for f in (0.6, 1.0, 1.4):
        torch.testing.assert_close(adjust_brightness(x, f), TF.adjust_brightness(x, f))
        torch.testing.assert_close(adjust_contrast(x, f), TF.adjust_contrast(x, f), atol=1e-4, rtol=0)
        torch.testing.assert_close(adjust_saturation(x, f), TF.adjust_saturation(x, f), atol=1e-4, rtol=0)
    for shift in (-0.1, -0.03, 0.0, 0.07, 0.5):
        torch.testing.assert_close(adjust_hue(x, shift), TF.adjust_hue(x, shift), atol=1e-5, rtol=0)
    for sigma in (0.1, 0.7, 2.0):
        k = 2 * math.ceil(3 * sigma) + 1
        torch.testing.assert_close(
            gaussian_blur(x, sigma), TF.gaussian_blur(x, [k, k], [sigma, sigma]), atol=1e-5, rtol=0
        )


def test_full_crop_matches_the_reference_pil_pipeline_with_the_same_params():
    """The reference applies torchvision v1 PIL ops and PIL's GaussianBlur / solarize; with the
    same decisions the two pipelines agree up to uint8 rounding and PIL's box-blur approximation."""
    image = smooth_image(120, 160, seed=3)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    p = CropParams(
        top=10,
        left=20,
        height=90,
        width=100,
        flip=True,
        jitter=((2, 0, 3, 1), 1.2, 0.8, 1.1, 0.04),
        grayscale=False,
        blur_sigma=1.2,
        solarize=True,
    )
    ours = unnormalise(MultiCropTransform().augment_crop(image, p, 64))
    ref = T.functional.resized_crop(pil, 10, 20, 90, 100, [64, 64], T.InterpolationMode.BICUBIC)
    ref = T.functional.hflip(ref)
    ref = T.functional.adjust_contrast(
        T.functional.adjust_hue(T.functional.adjust_brightness(T.functional.adjust_saturation(ref, 1.1), 1.2), 0.04),
        0.8,
    )
    ref = ImageOps.solarize(ref.filter(ImageFilter.GaussianBlur(radius=1.2)), 128)
    ref = T.functional.to_tensor(ref)
    difference = (ours - ref).abs()
    assert difference.mean() < 3 / 255 and difference.quantile(0.99) < 12 / 255


def test_defaults_are_the_papers():
    transform = MultiCropTransform()
    assert (transform.global_crops_size, transform.local_crops_size, transform.local_crops_number) == (224, 96, 8)
    assert transform.global_crops_scale == (0.4, 1.0) and transform.local_crops_scale == (0.05, 0.4)
    assert transform.ratio == pytest.approx((3 / 4, 4 / 3))
    assert (transform.brightness, transform.contrast, transform.saturation, transform.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (transform.flip_p, transform.jitter_p, transform.grayscale_p) == (0.5, 0.8, 0.2)
    assert transform.blur_p == (1.0, 0.1, 0.5) and transform.blur_sigma == (0.1, 2.0)
    assert (transform.solarize_p, transform.solarize_threshold) == (0.2, 128)
    assert torch.equal(transform.mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.equal(transform.std.flatten(), torch.tensor(IMAGENET_STD))


@pytest.mark.parametrize("height, width", [(1, 1), (5, 7), (1, 4000), (4000, 1), (20, 30)])
def test_tiny_and_extreme_images_give_finite_crops(height, width):
    transform = MultiCropTransform(32, 16, local_crops_number=2)
    crops = transform(smooth_image(height, width), torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(torch.isfinite(c).all() for c in crops)


def test_grayscale_tensor_input_and_bad_inputs():
    transform = MultiCropTransform(32, 16, local_crops_number=1)
    crops = transform(smooth_image(20, 20)[:1], torch.Generator().manual_seed(0))
    assert len(crops) == 3
    with pytest.raises(TypeError, match="uint8 tensor"):
        transform(torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match="too small for a blur"):
        MultiCropTransform(global_crops_size=6)
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropTransform(global_crops_scale=(0.5, 0.4))


def test_zero_local_crops_gives_two_global_crops():
    crops = MultiCropTransform(32, 16, local_crops_number=0)(smooth_image(40, 40))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2
