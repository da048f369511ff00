"""End-to-end DINO pretraining throughput on one GPU: images/s and model FLOPs utilisation (MFU).

ViT-S/16 (or another preset), 2 x 224 + 8 x 96 crops (`--global_size`, `--local_size`), out_dim
65536, bf16 autocast, fused AdamW, streamed from a folder of JPEGs (ImageNet-sized, 500 x 375,
generated here) through the real loader: with `--augment_on gpu` (default) the workers decode and
cap images to S x S (`DecodeAndCap`) and `BatchMultiCrop` makes the crops on the GPU; with
`--augment_on cpu` the workers run `MultiCropTransform`.

Three measurements in one run, on the same data:
1. the loader alone (no training): images/s of the workers, and per worker, so that the number of
   workers a GPU needs is known;
2. ours: the trainer's path, `DeviceBatches` (the next batch copied and cropped on a side stream while
   the step computes) and a step that reads nothing back (the loss is read at the end);
3. the serial baseline: the same step, but the batch copied and cropped on the main stream when the
   step asks for it and the loss read back after every step (`.item()`), as a loop that logs every
   step does.
For 2 and 3: images/s, MFU and the share of the wall time the loop waited for the loader.

MFU = model FLOPs per image x images/s / peak bf16 FLOPs (989 TFLOPs dense for H100 / H200 SXM;
`--peak_tflops` for others). Model FLOPs count the matrix products of the student's forward and
backward (3 x forward) on all crops and the teacher's forward on the 2 global crops, heads
included; no recomputation. Targets: ViT-S/16 >= 2,000 images/s (MFU >= 25 %) with < 5 % waiting.

Needs CUDA; on a machine without it, it says so and exits 0.

    python benchmarks/end_to_end.py [--batch 128] [--workers 14] [--steps 50] [--torch_compile]
    python benchmarks/end_to_end.py --model vit_tiny_patch8 --global_size 64 --local_size 32 --batch 256
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
from dino_hf.objectives.dino import DinoLoss
from dino_hf.training.batches import DeviceBatches, EndlessBatches
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.speed import apply_speed_options
from dino_hf.training.step import StepValues, train_step
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


def loader_rate(loader, batches: int) -> float:
    """Images/s of the loader alone over `batches` batches (after its workers started)."""
    iterator = EndlessBatches(loader)
    next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(iterator)["ids"])
    return images / (time.perf_counter() - start)


def timed_run(args, models, batches, steps: int, read_every_step: bool) -> dict:
    """`steps` training steps after `args.warmup`; images/s and the share of time spent waiting for
    batches."""
    student, teacher, dino_loss, optimizer, accelerator = models
    waited, loss = 0.0, None
    for step in range(args.warmup + steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            waited, start = 0.0, time.perf_counter()
        before = time.perf_counter()
        crops, _ = next(batches)
        waited += time.perf_counter() - before
        stats = train_step(
            student,
            teacher,
            dino_loss,
            optimizer,
            crops,
            StepValues(freeze_last_layer=False, **SCHEDULE),
            accelerator=accelerator,
        )
        loss = stats["loss"].item() if read_every_step else stats["loss"]
    final_loss = float(loss)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"images_per_second": args.batch * steps / elapsed, "waiting": waited / elapsed, "loss": final_loss}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16", help="a DinoModel preset")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--local_crops", type=int, default=8)
    parser.add_argument("--out_dim", type=int, default=65536)
    parser.add_argument("--augment_on", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--cap_size", type=int, default=None, help="S of DecodeAndCap (default 1.3 x global size)")
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
    backbone = build_backbone(args.model, drop_path_rate=0.1, image_size=args.global_size)
    config = backbone.model.config
    student = MultiCropWrapper(backbone, DinoHead(backbone.num_features, args.out_dim)).to(device)
    teacher = build_teacher(student)
    apply_speed_options(student, teacher, torch_compile=args.torch_compile)
    dino_loss = DinoLoss(args.out_dim, 2 + args.local_crops).to(device)
    optimizer = build_optimizer("adamw", get_param_groups(student), device=device)
    student, optimizer = accelerator.prepare(student, optimizer)
    models = (student, teacher, dino_loss, optimizer, accelerator)
    crop_sizes = dict(
        global_crops_size=args.global_size, local_crops_size=args.local_size, local_crops_number=args.local_crops
    )
    cap = args.cap_size or round(args.global_size * 1.3)

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_jpegs(folder, args.images)
        print(f"wrote {args.images} JPEGs of 500 x 375 in {time.perf_counter() - start:.0f} s")
        stream, column = load_image_stream(train_dir=folder)
        transform = DecodeAndCap(cap) if args.augment_on == "gpu" else MultiCropTransform(**crop_sizes)

        def batches(prefetch: bool) -> DeviceBatches:
            loader = build_multicrop_dataloader(
                stream,
                column,
                transform,
                batch_size=args.batch,
                num_workers=args.workers,
                shuffle_buffer_size=256,
                pin_memory=True,
            )
            multicrop = BatchMultiCrop(**crop_sizes).to(device) if args.augment_on == "gpu" else None
            return DeviceBatches(EndlessBatches(loader), device, multicrop=multicrop, prefetch=prefetch)

        loader = build_multicrop_dataloader(
            stream, column, transform, batch_size=args.batch, num_workers=args.workers, shuffle_buffer_size=256
        )
        workers_rate = loader_rate(loader, max(10, args.steps // 2))
        ours = timed_run(args, models, batches(prefetch=True), args.steps, read_every_step=False)
        baseline = timed_run(args, models, batches(prefetch=False), args.steps, read_every_step=True)

    flops = train_flops_per_image(config, args.global_size, args.local_size, args.local_crops, args.out_dim)
    for run in (ours, baseline):
        run["mfu"] = flops * run["images_per_second"] / (args.peak_tflops * 1e12)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model}, 2 x {args.global_size} + "
        f"{args.local_crops} x {args.local_size}, batch {args.batch}, bf16, fused AdamW"
        f"{', torch.compile' if args.torch_compile else ''}, augment on {args.augment_on}, {args.workers} loader "
        f"workers, {args.steps} timed steps after {args.warmup}; model GFLOPs per image {flops / 1e9:.1f}"
    )
    print(f"loader alone: {workers_rate:.0f} images/s, {workers_rate / args.workers:.0f} images/s per worker")
    print(f"{'':30s} {'ours':>10s} {'serial':>10s} {'ratio':>7s}")
    for label, key, scale, unit in (
        ("images/s", "images_per_second", 1, ""),
        ("MFU", "mfu", 100, " %"),
        ("waiting for data", "waiting", 100, " %"),
    ):
        a, b = ours[key] * scale, baseline[key] * scale
        print(f"{label + unit:30s} {a:10.1f} {b:10.1f} {a / b if b else float('nan'):6.2f}x")
    print(f"peak GPU memory                {torch.cuda.max_memory_allocated() / 2**30:10.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
