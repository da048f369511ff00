"""Multi-crop throughput on one CPU core: dino_hf's tensor transform vs the reference PIL pipeline.

The reference pipeline is the original DINO `DataAugmentationDINO`, built from torchvision v1
transforms on PIL images with the paper's parameters. Both run on the same JPEG images in the same
process, in alternating rounds; the best round of each is reported, for the transform alone (from
a decoded image) and with the JPEG decode. Then the streaming loader runs over a folder of those
images and the peak RSS is printed after N and after 10 N images (memory must stay flat).

    python benchmarks/multicrop.py [--images 64] [--rounds 3] [--stream 200]
"""

import argparse
import io
import random
import resource
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

from dino_hf.augment.multicrop import MultiCropTransform
from dino_hf.data.decoding import decode_image
from dino_hf.data.loader import build_multicrop_dataloader
from dino_hf.data.sources import load_image_stream


class ReferenceGaussianBlur:
    """The reference's PIL blur: radius U(0.1, 2) with probability p."""

    def __init__(self, p, radius_min=0.1, radius_max=2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() <= self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))
        return img


class ReferenceSolarization:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def reference_transform(local_crops_number=8):
    """The reference DataAugmentationDINO with the paper's parameters."""
    bicubic = T.InterpolationMode.BICUBIC
    flip_and_color_jitter = T.Compose(
        [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
    )
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    global_1 = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
            flip_and_color_jitter,
            ReferenceGaussianBlur(1.0),
            normalize,
        ]
    )
    global_2 = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
            flip_and_color_jitter,
            ReferenceGaussianBlur(0.1),
            ReferenceSolarization(0.2),
            normalize,
        ]
    )
    local = T.Compose(
        [
            T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic),
            flip_and_color_jitter,
            ReferenceGaussianBlur(p=0.5),
            normalize,
        ]
    )
    return lambda img: [global_1(img), global_2(img)] + [local(img) for _ in range(local_crops_number)]


def make_jpegs(count, height=375, width=500, seed=0):
    """ImageNet-sized JPEGs with smooth structure and noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 12, 16)).astype(np.float32))
        smooth = torch.nn.functional.interpolate(coarse, (height, width), mode="bicubic")[0].permute(1, 2, 0).numpy()
        pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def images_per_second(fn, inputs, rounds):
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for x in inputs:
            fn(x)
        best = min(best, time.perf_counter() - start)
    return len(inputs) / best


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="distinct 500 x 375 JPEGs")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per pipeline (best kept)")
    parser.add_argument("--stream", type=int, default=200, help="N of the RSS check (N and 10 N streamed images)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)

    jpegs = make_jpegs(args.images)
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    ours, reference = MultiCropTransform(), reference_transform()
    generator = torch.Generator().manual_seed(0)
    pipelines = {
        "transform": (lambda img: ours(img, generator), reference, decoded),
        "decode + transform": (
            lambda b: ours(decode_image(b), generator),
            lambda b: reference(Image.open(io.BytesIO(b)).convert("RGB")),
            jpegs,
        ),
    }
    print(f"multi-crop 2 x 224 + 8 x 96, {args.images} JPEGs of 500 x 375, 1 thread, best of {args.rounds} rounds")
    print(f"{'':20s} {'dino_hf (img/s)':>16s} {'reference PIL (img/s)':>22s} {'ratio':>7s}")
    for name, (fast, slow, inputs) in pipelines.items():
        ours_rate = images_per_second(fast, inputs, 1)  # warm-up
        ours_rate = max(images_per_second(fast, inputs, args.rounds), ours_rate)
        reference_rate = images_per_second(slow, inputs, args.rounds)
        print(f"{name:20s} {ours_rate:16.1f} {reference_rate:22.1f} {ours_rate / reference_rate:6.2f}x")

    with tempfile.TemporaryDirectory() as folder:
        for i, data in enumerate(jpegs):
            with open(f"{folder}/{i:05d}.jpg", "wb") as f:
                f.write(data)
        stream, column = load_image_stream(train_dir=folder)
        loader = build_multicrop_dataloader(stream, column, ours, batch_size=8, shuffle_buffer_size=64)
        seen, epoch, marks = 0, 0, {args.stream: None, 10 * args.stream: None}
        while seen < 10 * args.stream:
            loader.dataset.set_epoch(epoch)
            for batch in loader:
                seen += len(batch["ids"])
                for mark in marks:
                    if marks[mark] is None and seen >= mark:
                        marks[mark] = peak_rss_mib()
                if seen >= 10 * args.stream:
                    break
            epoch += 1
        print(
            f"peak RSS after {args.stream} streamed images: {marks[args.stream]:.0f} MiB; "
            f"after {10 * args.stream}: {marks[10 * args.stream]:.0f} MiB"
        )


if __name__ == "__main__":
    main()
