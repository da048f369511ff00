"""End-to-end DINO pretraining throughput on one GPU: images/s and model FLOPs utilisation (MFU).

ViT-S/16 (or another preset), 2 x 224 + 8 x 96 crops, out_dim 65536, bf16 autocast, fused AdamW,
streamed from a folder of JPEGs (ImageNet-sized, 500 x 375, generated here) through the real
loader: with `--augment_on gpu` (default) the workers decode and cap images to S x S
(`DecodeAndCap`) and `BatchMultiCrop` makes the crops on the GPU; with `--augment_on cpu` the
workers run `MultiCropTransform`. Each timed step is split into the time the loop waited for the
next batch (data) and the rest; GPU augmentation is timed with CUDA events.

MFU = model FLOPs per image x images/s / peak bf16 FLOPs (989 TFLOPs dense for H100 / H200 SXM;
`--peak_tflops` for others). Model FLOPs count the matrix products of the student's forward and
backward (3 x forward) on all crops and the teacher's forward on the 2 global crops, heads
included; no recomputation. Targets: MFU >= 40 %, data never the bottleneck (the loop waits for
data < 10 % of the step).

Needs CUDA; on a machine without it, it says so and exits 0.

    python benchmarks/end_to_end.py [--batch 128] [--workers 14] [--steps 50] [--torch_compile]
"""

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from dino_hf.augment.batch_multicrop import BatchMultiCrop, DecodeAndCap
from dino_hf.augment.multicrop import MultiCropTransform
from dino_hf.data.loader import build_multicrop_dataloader
from dino_hf.data.sources import load_image_stream
from dino_hf.models.backbones import build_backbone
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.training.loss import DinoLoss
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.speed import apply_speed_options
from dino_hf.training.step import train_step
from dino_hf.training.teacher import build_teacher

SCHEDULE = dict(lr=5e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04, clip_grad=3.0)


def vit_forward_flops(config: DinoConfig, image_size: int) -> float:
    """FLOPs of one forward of a `DinoModel` on one image: patch embedding, then per block
    24 N D^2 (q, k, v, output and the 4x MLP, 2 FLOPs per multiply-add) + 4 N^2 D (scores and
    weighted sum), N = 1 + patches."""
    patches = (image_size // config.patch_size) ** 2
    tokens, dim = patches + 1, config.hidden_size
    embed = 2 * patches * config.num_channels * config.patch_size**2 * dim
    linear = 2 * tokens * (4 * dim * dim + 2 * dim * config.intermediate_size)
    attention = 4 * tokens * tokens * dim
    return embed + config.num_hidden_layers * (linear + attention)


def head_forward_flops(dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256) -> float:
    return 2 * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out_dim)


def train_flops_per_image(config, global_size, local_size, local_crops, out_dim) -> float:
    head = head_forward_flops(config.hidden_size, out_dim)
    global_fwd = vit_forward_flops(config, global_size) + head
    local_fwd = vit_forward_flops(config, local_size) + head
    student = 3 * (2 * global_fwd + local_crops * local_fwd)
    teacher = 2 * global_fwd
    return student + teacher


def write_jpegs(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 12, 16)).astype(np.float32))
        smooth = torch.nn.functional.interpolate(coarse, (375, 500), mode="bicubic")[0].permute(1, 2, 0).numpy()
        pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        with open(os.path.join(folder, f"{index:06d}.jpg"), "wb") as f:
            f.write(buffer.getvalue())


def endless(loader):
    epoch = 0
    while True:
        loader.dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--local_crops", type=int, default=8)
    parser.add_argument("--out_dim", type=int, default=65536)
    parser.add_argument("--augment_on", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--cap_size", type=int, default=288, help="S of DecodeAndCap (--augment_on gpu)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--images", type=int, default=4096, help="JPEGs in the generated folder")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--torch_compile", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "benchmarks/end_to_end.py measures GPU pretraining and needs CUDA; no CUDA device here, nothing measured"
        )
        return 0
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16")
    device = accelerator.device
    torch.manual_seed(0)
    backbone = build_backbone(args.model, drop_path_rate=0.1)
    config = backbone.model.config
    student = MultiCropWrapper(backbone, DinoHead(backbone.num_features, args.out_dim)).to(device)
    teacher = build_teacher(student)
    apply_speed_options(student, teacher, torch_compile=args.torch_compile)
    dino_loss = DinoLoss(args.out_dim, 2 + args.local_crops).to(device)
    optimizer = build_optimizer("adamw", get_param_groups(student), device=device)
    student, optimizer = accelerator.prepare(student, optimizer)

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_jpegs(folder, args.images)
        print(f"wrote {args.images} JPEGs of 500 x 375 in {time.perf_counter() - start:.0f} s")
        stream, column = load_image_stream(train_dir=folder)
        if args.augment_on == "gpu":
            transform = DecodeAndCap(args.cap_size)
            gpu_crops = BatchMultiCrop(local_crops_number=args.local_crops).to(device)
        else:
            transform, gpu_crops = MultiCropTransform(local_crops_number=args.local_crops), None
        loader = build_multicrop_dataloader(
            stream,
            column,
            transform,
            batch_size=args.batch,
            num_workers=args.workers,
            shuffle_buffer_size=256,
            pin_memory=True,
        )
        batches = endless(loader)
        generator = torch.Generator(device=device).manual_seed(0)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.steps)
        ]
        waited = 0.0
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                torch.cuda.synchronize()
                waited, start = 0.0, time.perf_counter()
            before = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - before
            crops = [crop.to(device, non_blocking=True) for crop in batch["crops"]]
            if gpu_crops is not None:
                timed = step >= args.warmup
                if timed:
                    events[step - args.warmup][0].record()
                crops = gpu_crops(crops[0], generator)
                if timed:
                    events[step - args.warmup][1].record()
            train_step(
                student,
                teacher,
                dino_loss,
                optimizer,
                crops,
                freeze_last_layer=False,
                accelerator=accelerator,
                **SCHEDULE,
            )
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start

    rate = args.batch * args.steps / elapsed
    flops = train_flops_per_image(config, 224, 96, args.local_crops, args.out_dim)
    mfu = flops * rate / (args.peak_tflops * 1e12)
    print(
        f"{torch.cuda.get_device_name()}, {args.model}, 2 x 224 + {args.local_crops} x 96, batch {args.batch}, "
        f"bf16, fused AdamW{', torch.compile' if args.torch_compile else ''}, augment on {args.augment_on}, "
        f"{args.workers} loader workers, {args.steps} timed steps after {args.warmup}"
    )
    print(f"images/s                       {rate:10.1f}")
    print(f"model GFLOPs per image          {flops / 1e9:10.1f}")
    print(f"MFU (peak {args.peak_tflops:.0f} TFLOPs)          {100 * mfu:9.1f} %   (target >= 40 %)")
    print(f"waiting for data               {100 * waited / elapsed:9.1f} %   of the step (target < 10 %)")
    if gpu_crops is not None:
        augment_ms = sum(a.elapsed_time(b) for a, b in events) / args.steps
        print(
            f"GPU multi-crop                 {100 * augment_ms / 1e3 / (elapsed / args.steps):9.1f} %   "
            f"of the step ({args.batch / augment_ms * 1e3:.0f} images/s while cropping)"
        )
    print(f"peak GPU memory                {torch.cuda.max_memory_allocated() / 2**30:10.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
