"""Multi-crop images per second of `--augment_on gpu` (`BatchMultiCrop`) vs the CPU transform.

Both make the paper's 2 x 224 + 8 x 96 crops of the same capped images (S x S uint8, as
`DecodeAndCap` gives them): `MultiCropTransform` one image at a time on one CPU thread,
`BatchMultiCrop` a batch at a time on one CPU thread and, when CUDA is present, on the GPU
(target: >= 10,000 images/s on an H200). Best of the timed rounds. Decoding is not included.

    python benchmarks/batch_multicrop.py [--size 288] [--cpu_batch 16] [--gpu_batch 256] [--rounds 3]
"""

import argparse
import time

import torch

from dino_hf.augment.batch_multicrop import BatchMultiCrop
from dino_hf.augment.multicrop import MultiCropTransform


def smooth_images(batch, size, seed=0):
    """uint8 (B, 3, S, S) with smooth structure and noise, like decoded photographs."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 12, 12, generator=g) * 255
    smooth = torch.nn.functional.interpolate(coarse, (size, size), mode="bicubic")
    return (smooth + 10 * torch.randn(smooth.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def best_rate(fn, images_per_call, rounds, calls, cuda=False):
    best = float("inf")
    for _ in range(rounds):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return images_per_call * calls / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=288, help="side S of the capped images")
    parser.add_argument("--cpu_batch", type=int, default=16)
    parser.add_argument("--gpu_batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    images = smooth_images(args.cpu_batch, args.size)
    per_image, batched = MultiCropTransform(), BatchMultiCrop()
    generator = torch.Generator().manual_seed(0)
    per_image(images[0], generator)  # warm-up
    batched(images, generator)
    cpu_per_image = best_rate(lambda: [per_image(image, generator) for image in images], len(images), args.rounds, 1)
    cpu_batched = best_rate(lambda: batched(images, generator), len(images), args.rounds, 1)
    print(f"multi-crop 2 x 224 + 8 x 96 of {args.size} x {args.size} uint8 images, best of {args.rounds} rounds")
    print(f"{'':44s} {'images/s':>10s}")
    print(f"{'MultiCropTransform, CPU, 1 thread':44s} {cpu_per_image:10.1f}")
    print(
        f"{'BatchMultiCrop, CPU, 1 thread, batch ' + str(args.cpu_batch):44s} {cpu_batched:10.1f}"
        f"   ({cpu_batched / cpu_per_image:.2f}x)"
    )
    if torch.cuda.is_available():
        gpu_images = smooth_images(args.gpu_batch, args.size).cuda()
        gpu_generator = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(3):
            batched(gpu_images, gpu_generator)  # warm-up (kernels, allocator)
        rate = best_rate(lambda: batched(gpu_images, gpu_generator), args.gpu_batch, args.rounds, 10, cuda=True)
        name = f"BatchMultiCrop, {torch.cuda.get_device_name()}, batch {args.gpu_batch}"
        print(f"{name:44s} {rate:10.1f}   (target >= 10,000 on an H200)")
    else:
        print("no CUDA device: the GPU figure (target >= 10,000 images/s on an H200) was not measured")


if __name__ == "__main__":
    main()
