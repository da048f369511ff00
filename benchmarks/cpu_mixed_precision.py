"""bf16 autocast against fp32 for DINO training steps on the CPU, through Accelerate as the trainer runs
them: which should a config's `mixed_precision: bf16` give on a machine without a GPU?

Each precision runs in its own subprocess (Accelerate's state is one per process), on the same random
crops, alternately `--repeats` times, the best kept against the noise of shared CPUs. A step is
`dino_hf.training.step.train_step` on an `accelerator.prepare`d student, as in the trainer.
Models: the demo's (configs/demo.yaml: timm's resnet10t, 64 / 32 px crops, 4 local crops, batch 32)
and configs/small_data_vit.yaml's ViT (vit_tiny_patch8 with 6 blocks on the same crops).

    python benchmarks/cpu_mixed_precision.py                      # both models, 1 + 3 steps, 2 repeats
    python benchmarks/cpu_mixed_precision.py --models resnet10t --threads 1

Measured on an AMD EPYC (AVX512-BF16), 1 thread, seconds per step, fp32 / bf16: resnet10t 0.976 / 0.617
(bf16 0.63x the time), the ViT 1.732 / 1.467 (0.85x). The same CPU kept to AVX2 as a CPU without bf16
instructions (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ... --models resnet10t --batch 8 --steps 1
--repeats 1`): 0.387 / 10.777 (27.9x). Hence `dino_hf.training.plan.run_mixed_precision`: bf16 on a CPU
with bf16 instructions, fp32 on the others.
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from dino_hf.models.backbones import build_backbone
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.objectives.dino import DinoLoss
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.step import StepValues, train_step
from dino_hf.training.teacher import build_teacher

MODELS = {
    "resnet10t": dict(spec="timm:resnet10t", overrides={}),
    "vit_tiny_patch8_6": dict(spec="vit_tiny_patch8", overrides={"num_hidden_layers": 6}),
}
SCHEDULE = dict(lr=5e-4, weight_decay=0.04, momentum=0.99, teacher_temp=0.04, clip_grad=3.0)


def worker(args) -> None:
    """One model at one precision: prints a JSON line with the seconds of a step."""
    from accelerate import Accelerator

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(mixed_precision=args.worker, cpu=True)
    torch.manual_seed(0)
    model = MODELS[args.model]
    backbone = build_backbone(model["spec"], drop_path_rate=0.0, image_size=args.global_size, **model["overrides"])
    student = MultiCropWrapper(
        backbone, DinoHead(backbone.num_features, args.out_dim, hidden_dim=512, bottleneck_dim=128)
    )
    teacher = build_teacher(student)
    dino_loss = DinoLoss(args.out_dim, 2 + args.local_crops)
    optimizer = build_optimizer("adamw", get_param_groups(student))
    student, optimizer = accelerator.prepare(student, optimizer)
    generator = torch.Generator().manual_seed(0)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    crops = [torch.randn(args.batch, 3, size, size, generator=generator) for size in sizes]

    def step():
        metrics = train_step(
            student,
            teacher,
            dino_loss,
            optimizer,
            crops,
            StepValues(freeze_last_layer=False, **SCHEDULE),
            accelerator=accelerator,
        )
        return metrics["loss"].item()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = (time.perf_counter() - start) / args.steps
    print(json.dumps({"step_seconds": seconds, "loss": loss}))


def measure(args, model: str, precision: str) -> float:
    command = [sys.executable, __file__, "--worker", precision, "--model", model]
    for name in ("batch", "global_size", "local_size", "local_crops", "out_dim", "warmup", "steps", "threads"):
        command += [f"--{name}", str(getattr(args, name))]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])["step_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--models", default=",".join(MODELS), help=f"Comma-separated, of {', '.join(MODELS)}.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--global_size", type=int, default=64)
    parser.add_argument("--local_size", type=int, default=32)
    parser.add_argument("--local_crops", type=int, default=4)
    parser.add_argument("--out_dim", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", choices=("no", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"CPU, {args.threads} threads, batch {args.batch}, {args.global_size} / {args.local_size} px crops")
    print(f"{'model':<20} {'fp32 s/step':>12} {'bf16 s/step':>12} {'bf16 / fp32':>12}")
    for model in args.models.split(","):
        best = {"no": float("inf"), "bf16": float("inf")}
        for _ in range(args.repeats):
            for precision in best:
                best[precision] = min(best[precision], measure(args, model, precision))
        print(f"{model:<20} {best['no']:>12.3f} {best['bf16']:>12.3f} {best['bf16'] / best['no']:>12.2f}")


if __name__ == "__main__":
    main()
