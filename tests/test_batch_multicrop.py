import itertools
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from dino_hf.augment.batch_multicrop import BatchMultiCrop, DecodeAndCap, resized_crops
from dino_hf.augment.multicrop import CropParams, MultiCropTransform
from dino_hf.data.loader import collate_multicrop
from dino_hf.models.image_processing_dino import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
TINY = dict(global_crops_size=32, local_crops_size=16, local_crops_number=3)


def smooth_images(batch, size, seed=0):
    """uint8 (B, 3, S, S): smooth random colour images (upsampled coarse noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, size // 6), max(2, size // 6), generator=g)
    return (torch.nn.functional.interpolate(coarse, (size, size), mode="bilinear") * 255).round().to(torch.uint8)


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    grid = np.concatenate([a, b])
    return np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)))


def test_shapes_dtypes_and_seeded_determinism():
    images = smooth_images(5, 40)
    transform = BatchMultiCrop(**TINY)
    crops = transform(images, torch.Generator().manual_seed(3))
    assert [tuple(c.shape) for c in crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    again = transform(images, torch.Generator().manual_seed(3))
    other = transform(images, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(crops, again))
    assert not any(torch.equal(x, y) for x, y in zip(crops, other))
    # Every image gets its own crops: no two rows of a crop batch are equal.
    assert all(not torch.equal(c[0], c[1]) for c in crops)


def test_global_crops_only_and_bad_input():
    transform = BatchMultiCrop(global_crops_size=32, local_crops_size=16, local_crops_number=0)
    assert len(transform(smooth_images(2, 40))) == 2
    with pytest.raises(TypeError, match="uint8"):
        transform(smooth_images(2, 40).float())
    with pytest.raises(ValueError, match="too small"):
        BatchMultiCrop(global_crops_size=32, local_crops_size=6)


def test_resized_crops_equal_torchvision_antialiased_bicubic():
    pixels = torch.rand(3, 3, 50, 60)
    boxes = torch.tensor(
        [[0, 0, 50, 60], [3, 7, 20, 31], [10, 2, 40, 13], [5, 5, 7, 9], [1, 2, 3, 4], [0, 30, 50, 30]]
    )
    flip = torch.tensor([False, False, True, False, True, True])
    for size in (16, 32):  # down- and up-sampling
        out = resized_crops(pixels, boxes.float(), flip, size)
        for row, (box, flipped) in enumerate(zip(boxes.tolist(), flip.tolist())):
            expected = TF.resized_crop(pixels[row % 3], *box, [size, size], InterpolationMode.BICUBIC, antialias=True)
            expected = expected.clamp(0, 1).flip(-1) if flipped else expected.clamp(0, 1)
            torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=0)


def sampled_boxes(transform, batch, size, local):
    params = transform.sample_params(batch, size, size, torch.Generator().manual_seed(0))[1 if local else 0]
    top, left, h, w = params.boxes.double().T
    return top, left, h, w


@pytest.mark.parametrize("local", [False, True])
def test_crop_boxes_follow_random_resized_crop(local):
    size, batch = 512, 3000
    transform = BatchMultiCrop(**TINY)
    top, left, h, w = sampled_boxes(transform, batch, size, local)
    assert torch.equal(h, h.round()) and torch.equal(top, top.round())
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= size).all() and (left + w <= size).all()
    area, log_ratio = (h * w / size**2).numpy(), torch.log(w / h).numpy()
    scale = (0.05, 0.4) if local else (0.4, 1.0)
    assert scale[0] - 0.01 <= area.min() and area.max() <= scale[1] + 0.01
    assert math.log(3 / 4) - 0.01 <= log_ratio.min() and log_ratio.max() <= math.log(4 / 3) + 0.01
    # Same distribution as torchvision's RandomResizedCrop on the same image size.
    torch.manual_seed(0)
    reference = [
        T.RandomResizedCrop.get_params(torch.empty(1, size, size), list(scale), [3 / 4, 4 / 3])
        for _ in range(len(area))
    ]
    ref_area = np.array([r[2] * r[3] / size**2 for r in reference])
    ref_log_ratio = np.array([math.log(r[3] / r[2]) for r in reference])
    ref_top = np.array([r[0] for r in reference])
    # KS critical value at alpha 0.001 for two samples of 3000 (or 6000 vs 6000): 1.95 sqrt(2 / n).
    critical = 1.95 * math.sqrt(2 / len(area))
    assert ks_statistic(area, ref_area) < critical
    assert ks_statistic(log_ratio, ref_log_ratio) < critical
    assert ks_statistic(top.numpy(), ref_top) < critical
    if local:  # no attempt is rejected: area and log-ratio are uniform on their ranges
        uniform = np.random.default_rng(0).uniform(size=len(area))
        assert ks_statistic((area - 0.05) / 0.35, uniform) < critical
        assert ks_statistic((log_ratio - math.log(3 / 4)) / (2 * math.log(4 / 3)), uniform) < critical


def test_random_op_rates_match_the_spec():
    batch = 4000
    transform = BatchMultiCrop(**TINY)
    global_params, local_params = transform.sample_params(batch, 64, 64, torch.Generator().manual_seed(1))
    crop1, crop2 = (slice(0, batch), slice(batch, 2 * batch))

    def rate(mask):
        return mask.float().mean().item()

    # 4 standard deviations of a binomial rate over 4000 samples are <= 0.032.
    for params in (global_params, local_params):
        assert rate(params.flip) == pytest.approx(0.5, abs=0.03)
        assert rate(params.jitter) == pytest.approx(0.8, abs=0.03)
        assert rate(params.grayscale) == pytest.approx(0.2, abs=0.03)
    assert rate(global_params.blur[crop1]) == 1.0
    assert rate(global_params.blur[crop2]) == pytest.approx(0.1, abs=0.02)
    assert rate(local_params.blur) == pytest.approx(0.5, abs=0.02)
    assert rate(global_params.solarize[crop2]) == pytest.approx(0.2, abs=0.03)
    assert not global_params.solarize[crop1].any() and not local_params.solarize.any()
    sigma = global_params.sigma
    assert 0.1 <= sigma.min() < 0.11 and 1.99 < sigma.max() <= 2.0 and sigma.mean() == pytest.approx(1.05, abs=0.03)
    factors = local_params.factors
    for column, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert low <= factors[:, column].min() < low + 0.01 and high - 0.01 < factors[:, column].max() <= high
    orders = [tuple(o) for o in local_params.order.tolist()]
    counts = {perm: orders.count(perm) for perm in itertools.permutations(range(4))}
    assert min(counts.values()) > 0.6 * len(orders) / 24 and max(counts.values()) < 1.4 * len(orders) / 24


def test_grayscale_rate_in_the_output_pixels():
    transform = BatchMultiCrop(global_crops_size=16, local_crops_size=8, local_crops_number=2)
    crops = transform(smooth_images(500, 24, seed=1), torch.Generator().manual_seed(2))
    gray = []
    for crop in crops:
        pixels = crop * STD + MEAN  # (500, 3, h, w), un-normalised
        spread = (pixels.amax(dim=1) - pixels.amin(dim=1)).amax(dim=(1, 2))  # (500,) largest channel gap
        gray.append(spread < 1e-5)
    assert torch.cat(gray).float().mean().item() == pytest.approx(0.2, abs=0.04)


def cpu_params(params, row):
    """The CropParams of one row of BatchCropParams, for MultiCropTransform.augment_crop."""
    top, left, h, w = (int(v) for v in params.boxes[row].tolist())
    jitter = None
    if params.jitter[row]:
        jitter = (tuple(params.order[row].tolist()), *params.factors[row].tolist())
    return CropParams(
        top=top,
        left=left,
        height=h,
        width=w,
        flip=bool(params.flip[row]),
        jitter=jitter,
        grayscale=bool(params.grayscale[row]),
        blur_sigma=params.sigma[row].item() if params.blur[row] else None,
        solarize=bool(params.solarize[row]),
    )


# The paper's colour jitter, and a strong one (the whole hue circle, --color_jitter 0.4 0.4 0.8 0.5).
STRONG_COLOUR = dict(jitter_p=1.0, saturation=0.8, hue=0.5, grayscale_p=0.5)


@pytest.mark.parametrize("colour", [{}, STRONG_COLOUR], ids=["paper", "strong"])
def test_each_crop_equals_the_cpu_transform_with_the_same_decisions(colour):
    # The CPU path rounds the resized crop to uint8: differences of about 1/255 before the colour
    # operations, more at the few pixels that the solarisation threshold or a clamp separates.
    batch = 6
    images = smooth_images(batch, 40, seed=4)
    transform = BatchMultiCrop(**TINY, **colour)
    cpu = MultiCropTransform(**TINY, **colour)
    groups = transform.sample_params(batch, 40, 40, torch.Generator().manual_seed(7))
    pixels = images.float() / 255
    for params, size in zip(groups, (32, 16)):
        ours = transform.apply(pixels, params, size)
        for row in range(ours.shape[0]):
            expected = cpu.augment_crop(images[row % batch], cpu_params(params, row), size)
            diff = (ours[row] - expected).abs()
            assert diff.mean() < 0.01, (row, cpu_params(params, row))
            assert (diff > 0.05).float().mean() < 0.02, (row, cpu_params(params, row))


def test_decode_and_cap_resizes_the_short_side_and_crops_a_square():
    image = smooth_images(1, 60)[0]  # (3, 60, 60)
    wide = torch.cat([image, image.flip(-1)], dim=2)  # (3, 60, 120)
    pil = Image.fromarray(wide.permute(1, 2, 0).numpy())
    centre = DecodeAndCap(30, random_crop=False)(pil)
    assert len(centre) == 1 and centre[0].dtype == torch.uint8 and centre[0].shape == (3, 30, 30)
    expected = TF.center_crop(TF.resize(wide, [30, 60], InterpolationMode.BICUBIC, antialias=True), [30, 30])
    assert torch.equal(centre[0], expected)
    cap = DecodeAndCap(30)
    a, b = cap(wide, torch.Generator().manual_seed(0)), cap(wide, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0])
    lefts = set()
    for seed in range(30):
        crop = cap(wide, torch.Generator().manual_seed(seed))[0]
        resized = TF.resize(wide, [30, 60], InterpolationMode.BICUBIC, antialias=True)
        lefts |= {left for left in range(31) if torch.equal(resized[:, :, left : left + 30], crop)}
    assert len(lefts) > 10  # the square moves along the long side
    small = DecodeAndCap(48, random_crop=False)(image[:, :20, :30])[0]  # upscaled to a 48 px short side
    assert small.shape == (3, 48, 48)
    batch = collate_multicrop(
        [{"crops": cap(wide, torch.Generator().manual_seed(i)), "id": str(i), "skipped": {}} for i in range(4)]
    )
    assert [tuple(c.shape) for c in batch["crops"]] == [(4, 3, 30, 30)]
    crops = BatchMultiCrop(**TINY)(batch["crops"][0], torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_crops_equal_cpu_crops_with_the_same_decisions():
    images = smooth_images(4, 40)
    transform = BatchMultiCrop(**TINY)
    groups = transform.sample_params(4, 40, 40, torch.Generator(device="cuda").manual_seed(0), device="cuda")
    cuda_pixels, cpu_pixels = images.cuda().float() / 255, images.float() / 255
    for params, size in zip(groups, (32, 16)):
        on_cpu = type(params)(**{k: v.cpu() for k, v in vars(params).items()})
        torch.testing.assert_close(
            transform.apply(cuda_pixels, params, size).cpu(),
            transform.apply(cpu_pixels, on_cpu, size),
            atol=2e-3,
            rtol=0,
        )
    crops = transform(images.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert all(c.is_cuda and torch.isfinite(c).all() for c in crops)
