"""One DINO training step of ViT-S/16 with 2 x 224 + 8 x 96 crops: dino_hf's vs a plain baseline.

Ours: `dino_hf.training.step.train_step` (one backbone call per crop resolution, the head once on all
crops, SDPA attention, multi-tensor EMA) with fused AdamW kernels where the device has them
(`build_optimizer(..., device=)`), and on a GPU bf16 autocast through Accelerate (plus
`--torch_compile` if asked).
Baseline, written here from the formulas of docs/recipe.md alone: one backbone call per crop,
attention through an explicit softmax (DinoModel's `output_attentions=True` path), the loss as a
Python loop over crop pairs, per-parameter clipping in a loop, PyTorch's for-loop AdamW, an EMA in a
Python loop, fp32.

Both run on the same random crops (data loading is not part of the step), each in its own
subprocess so that peak memory is its own, alternately `--repeats` times (best kept, against the
noise of shared CPUs): on CPU the rise of the peak RSS (getrusage) during the
steps over the peak after building the models, on GPU `torch.cuda.max_memory_allocated` over the
memory held before the first step. Images are source images (10 crops each) per second.

    python benchmarks/train_step.py                  # CPU: batch 4, 2 x (1 warm-up + 1 timed step)
    python benchmarks/train_step.py --batch 128      # GPU (bf16): defaults batch 128, 5 + 20 steps

With `--anchor`, the comparison is our step with anchoring to the start on (the Gram loss at weight 1
and the cosine term at weight 1 against a frozen copy of the backbone, `dino_hf.objectives.anchor`)
against our step without it, side by side, with the anchor's weights in MiB (the extra memory it
holds beside the student and the teacher):

    python benchmarks/train_step.py --anchor

With `--ibot`, our step with iBOT's masked-patch loss (weight 1, DINOv2's masking: half the global crops
masked, 10-50 % of their patches each, through the shared head), and with iBOT and the Gram loss (weight
1, against a frozen copy of the backbone: an EMA Gram teacher costs the same step), against our step
with DINO alone, in three columns with the ratios to DINO alone:

    python benchmarks/train_step.py --ibot

With `--distill`, a distillation step (`--distill_from`, `configs/distill.yaml`'s objective: the global
queue KL and the local patch-similarity KL, no DINO loss) of a ViT-S/16 frozen model into a ResNet-18
student on one 224 px view, against the DINO multi-crop step of the same student (2 x 224 + 8 x 96), batch
8 (random weights: the cost of a step does not depend on them); it also prints the frozen model's share
of the distillation step (its forward alone, timed apart). A third column is the distillation step as runs
made it before they held only what they use: with an EMA copy of the student updated every step and a DINO
center of 65,536 prototypes, both written into every checkpoint; the rows give the whole run's peak memory and
the bytes of a checkpoint's weight files:

    python benchmarks/train_step.py --distill

With `--distill_multi`, the several-teacher step (`configs/distill_multi.yaml`'s objective) of a ViT-S/16 and a
ViT-B/16 into the ResNet-18 beside the one-teacher step of the ViT-S/16, and the ViT-B/16's forward alone: two
teachers should cost the one-teacher step plus the second teacher's forward:

    python benchmarks/train_step.py --distill_multi

With `--lora`, a continued-pretraining step with the Gram anchor to the start (weight 1) trained through
LoRA (`--lora_rank 64 --unfreeze_last_blocks 1`, ExPLoRA's recipe, `configs/continue_pretraining_lora.yaml`:
student, teacher and anchor share the frozen base weights, held in bf16 under bf16 autocast as the trainer
holds them) against the same step training the whole backbone
(student, teacher, anchor and AdamW's moments each a copy of the weights), for ViT-B/16 and ViT-L/16 (DinoModel
presets; random weights: the cost of a step does not depend on them). Its memory row is the whole run's: the
peak GPU memory from before the networks are built (CPU: the rise of the peak RSS over the process's before
them), and it prints the trainable parameters of the backbone:

    python benchmarks/train_step.py --lora --steps 1 --repeats 1            # CPU: ViT-B/16 and ViT-L/16
    python benchmarks/train_step.py --lora --models vit_base_patch16        # one of them
    python benchmarks/train_step.py --lora --steps 1 --repeats 1 --cpu_bf16 # CPU in bf16, as the configs

Per-step overhead (Python, launches, host synchronisation) shows with a tiny model on small crops,
where the arithmetic is negligible; steps/s is then the figure:

    python benchmarks/train_step.py --model vit_tiny_patch16 --global_size 32 --local_size 16 \
        --local_crops 2 --out_dim 1024 --batch 8 --warmup 3 --steps 30
"""

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from dino_hf.data.masks import BlockMasking
from dino_hf.models.backbones import build_backbone
from dino_hf.models.distill_projector import DistillHeads, DistillProjector
from dino_hf.models.heads import DinoHead
from dino_hf.models.lora import add_lora_, hold_base_in_, shared_parameters
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.models.normalization import normalization_of
from dino_hf.objectives.anchor import Anchor, AnchorTerm
from dino_hf.objectives.balancing import build_balancing
from dino_hf.objectives.dino import DinoLoss
from dino_hf.objectives.distillation import Distillation, FrozenModel
from dino_hf.objectives.ibot import IBotLoss, IBotTerm
from dino_hf.objectives.multi_distillation import MultiDistillation, Teacher
from dino_hf.training.networks import frozen_widths
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.speed import apply_speed_options
from dino_hf.training.step import StepValues, train_step
from dino_hf.training.teacher import build_teacher

SCHEDULE = dict(lr=5e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04, clip_grad=3.0)


# The --lora comparison: ExPLoRA's rank and unfrozen block (configs/continue_pretraining_lora.yaml).
LORA_RANK, LORA_UNFROZEN = 64, 1
# The --distill comparison: a ViT-S/16 frozen model, a ResNet-18 student.
DISTILL_FROZEN, DISTILL_STUDENT = "vit_small_patch16", "timm:resnet18"
# The --distill_multi comparison's second frozen model.
DISTILL_SECOND = "vit_base_patch16"


def build(args, device, mask_token: bool = False, model: str | None = None):
    torch.manual_seed(0)
    backbone = build_backbone(model or args.model, drop_path_rate=0.1, mask_token=mask_token)
    student = MultiCropWrapper(backbone, DinoHead(backbone.num_features, args.out_dim)).to(device)
    teacher = build_teacher(student)
    dino_loss = DinoLoss(args.out_dim, 2 + args.local_crops).to(device)
    generator = torch.Generator(device).manual_seed(0)
    crops = [
        torch.randn(args.batch, 3, args.global_size, args.global_size, device=device, generator=generator)
        for _ in range(2)
    ]
    crops += [
        torch.randn(args.batch, 3, args.local_size, args.local_size, device=device, generator=generator)
        for _ in range(args.local_crops)
    ]
    return student, teacher, dino_loss, crops


def ibot_term(args, student, device) -> IBotTerm:
    """iBOT's term: the loss at weight 1 and the masks of one batch (DINOv2's masking)."""
    side = args.global_size // student.backbone.model.config.patch_size
    masks = BlockMasking(grid=(side, side)).draw(args.batch, np.random.default_rng(0))
    return IBotTerm(IBotLoss(args.out_dim).to(device), 1.0, masks.to(device))


def _on_accelerator(student, optimizer, device, cpu_bf16: bool = False):
    """On a GPU, or on the CPU with `cpu_bf16`, the student and optimiser prepared by an Accelerator in bf16
    (and that accelerator); otherwise on the CPU, as they are (fp32, no accelerator)."""
    if device.type != "cuda" and not cpu_bf16:
        return student, optimizer, None
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type != "cuda")
    student, optimizer = accelerator.prepare(student, optimizer)
    return student, optimizer, accelerator


def ours(args, device, variant: str = "ours"):
    """A function doing one step with dino_hf's train_step and speed options. `variant`: `ours` (DINO
    alone); `anchored`, with the Gram loss and the cosine term (weights 1) against a frozen copy of the
    starting backbone; `ibot`, with iBOT's loss (weight 1); `ibot_gram`, with iBOT and the Gram loss
    (weights 1). Also returns the bytes of the anchor's weights (0 without one)."""
    ibot = variant in ("ibot", "ibot_gram")
    student, teacher, dino_loss, crops = build(args, device, mask_token=ibot)
    terms = [ibot_term(args, student, device)] if ibot else []
    anchor = None
    if variant in ("anchored", "ibot_gram"):  # taken before the speed options, as the trainer does
        cosine = variant == "anchored"
        anchor = Anchor(student.backbone, gram=True, cosine=cosine).to(device)
        terms.append(AnchorTerm(anchor, gram_weight=1.0, cosine_weight=float(cosine)))
    apply_speed_options(student, teacher, torch_compile=args.torch_compile)
    optimizer = build_optimizer("adamw", get_param_groups(student), device=device)
    student, optimizer, accelerator = _on_accelerator(student, optimizer, device, args.cpu_bf16)

    def step():
        values = StepValues(**SCHEDULE)
        return train_step(student, teacher, dino_loss, optimizer, crops, values, accelerator=accelerator, terms=terms)

    anchor_bytes = 0
    if anchor is not None:
        anchor_bytes = sum(t.numel() * t.element_size() for t in anchor.state_dict().values())
    return step, anchor_bytes


def continued(args, device, lora: bool):
    """A function doing one continued-pretraining step with the Gram anchor to the start (weight 1): through
    LoRA with the frozen base held once (`lora`), or training the whole backbone. Also returns the trainable
    parameters of the backbone."""
    torch.manual_seed(0)
    backbone = build_backbone(args.model, drop_path_rate=0.1)
    if lora:
        add_lora_(backbone, rank=LORA_RANK, base=args.model, unfreeze_last_blocks=LORA_UNFROZEN)
        if device.type == "cuda" or args.cpu_bf16:  # under bf16 the trainer holds the base in bf16
            hold_base_in_(backbone, torch.bfloat16)
    student = MultiCropWrapper(backbone, DinoHead(backbone.num_features, args.out_dim)).to(device)
    teacher = build_teacher(student, shared_parameters(backbone) if lora else None)
    anchor = Anchor(student.backbone, gram=True, cosine=False).to(device)
    dino_loss = DinoLoss(args.out_dim, 2 + args.local_crops).to(device)
    generator = torch.Generator(device).manual_seed(0)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    crops = [torch.randn(args.batch, 3, size, size, device=device, generator=generator) for size in sizes]
    optimizer = build_optimizer("adamw", get_param_groups(student), device=device)
    student, optimizer, accelerator = _on_accelerator(student, optimizer, device, args.cpu_bf16)

    def step():
        values, terms = StepValues(**SCHEDULE), [AnchorTerm(anchor, 1.0)]
        return train_step(student, teacher, dino_loss, optimizer, crops, values, accelerator=accelerator, terms=terms)

    return step, sum(p.numel() for p in backbone.parameters() if p.requires_grad)


def distilled(args, device, ema_copy: bool = False):
    """A function doing one distillation step (no DINO loss) of the frozen ViT-S/16 into the ResNet-18 on one
    view, one doing the frozen model's forward alone, and the bytes of a checkpoint's weight files (the
    student, the queue; with `ema_copy`, as before, also an EMA copy of the student and a DINO center of
    65,536)."""
    torch.manual_seed(0)
    frozen_backbone = build_backbone(DISTILL_FROZEN, drop_path_rate=0.0)
    backbone = build_backbone(DISTILL_STUDENT, drop_path_rate=0.0)
    projector = DistillProjector(backbone.num_features, backbone.model.num_features, frozen_backbone.num_features)
    student = MultiCropWrapper(backbone, torch.nn.Identity(), distill_projector=projector).to(device)
    teacher = build_teacher(student) if ema_copy else None
    dino_loss = DinoLoss(65536, 2).to(device) if ema_copy else None
    frozen = FrozenModel(frozen_backbone, DISTILL_FROZEN, normalization_of(backbone))
    distillation = Distillation(frozen, 1024).to(device)
    generator = torch.Generator(device).manual_seed(0)
    view = torch.randn(args.batch, 3, args.global_size, args.global_size, device=device, generator=generator)
    optimizer = build_optimizer("adamw", get_param_groups(student), device=device)
    student, optimizer, accelerator = _on_accelerator(student, optimizer, device, args.cpu_bf16)
    values = StepValues(dino_weight=0.0, **SCHEDULE)
    saved = [student, distillation.queue] + ([teacher, dino_loss] if ema_copy else [])
    checkpoint_bytes = sum(t.numel() * t.element_size() for part in saved for t in part.state_dict().values())

    def step():
        return train_step(
            student, teacher, dino_loss, optimizer, [view], values, accelerator=accelerator, terms=[distillation]
        )

    def frozen_forward():
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            return frozen(view)

    return step, frozen_forward, checkpoint_bytes


def distilled_from_two(args, device):
    """A function doing one step of the several-teacher objective (`configs/distill_multi.yaml`'s: summary cosine,
    features 0.9 cosine + 0.1 smooth-L1 after PHI-S, MLP heads) of the frozen ViT-S/16 and a frozen ViT-B/16 into
    the ResNet-18 on one view, and one doing the ViT-B/16's forward alone (what the second teacher should cost)."""
    torch.manual_seed(0)
    backbones = [build_backbone(spec, drop_path_rate=0.0) for spec in (DISTILL_FROZEN, DISTILL_SECOND)]
    backbone = build_backbone(DISTILL_STUDENT, drop_path_rate=0.0)
    widths = [frozen_widths(frozen, args.global_size) for frozen in backbones]
    heads = DistillHeads(
        DistillProjector(backbone.num_features, backbone.model.num_features, patch, "mlp", summary_dim=summary)
        for summary, patch in widths
    )
    student = MultiCropWrapper(backbone, torch.nn.Identity(), distill_projector=heads).to(device)
    teachers = [
        Teacher(FrozenModel(frozen, spec, normalization_of(backbone)), spec, 1.0, build_balancing("phi_s", patch), *w)
        for frozen, spec, w, (_, patch) in zip(backbones, (DISTILL_FROZEN, DISTILL_SECOND), widths, widths)
    ]
    distillation = MultiDistillation(teachers).to(device)
    generator = torch.Generator(device).manual_seed(0)
    view = torch.randn(args.batch, 3, args.global_size, args.global_size, device=device, generator=generator)
    distillation.observe(view)
    distillation.fit()
    optimizer = build_optimizer("adamw", get_param_groups(student), device=device)
    student, optimizer, accelerator = _on_accelerator(student, optimizer, device, args.cpu_bf16)
    values = StepValues(dino_weight=0.0, **SCHEDULE)

    def step():
        return train_step(
            student, None, None, optimizer, [view], values, accelerator=accelerator, terms=[distillation]
        )

    def second_forward():
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            return teachers[1].frozen(view)

    return step, second_forward


def baseline(args, device):
    """A function doing one step as docs/recipe.md#training-step describes it, with nothing fused or grouped."""
    student, teacher, dino_loss, crops = build(args, device)
    center = dino_loss.center
    optimizer = torch.optim.AdamW(get_param_groups(student), foreach=False)

    def features(model, crop):  # one backbone call per crop, attention weights computed explicitly
        return model.head(model.backbone.model(crop, output_attentions=True).pooler_output)

    def step():
        for group in optimizer.param_groups:
            group["lr"] = SCHEDULE["lr"]
            if group["regularized"]:
                group["weight_decay"] = SCHEDULE["weight_decay"]
        with torch.no_grad():
            teacher_out = [features(teacher, crop) for crop in crops[:2]]
        student_out = [features(student, crop) for crop in crops]
        total, terms = 0.0, 0
        for iq, t in enumerate(teacher_out):
            q = torch.softmax((t - center) / SCHEDULE["teacher_temp"], dim=-1)
            for v, s in enumerate(student_out):
                if v != iq:
                    total = total + torch.sum(-q * torch.log_softmax(s / 0.1, dim=-1), dim=-1).mean()
                    terms += 1
        loss = total / terms
        loss.backward()
        for p in student.parameters():
            if p.grad is not None:
                coefficient = SCHEDULE["clip_grad"] / (p.grad.norm() + 1e-6)
                if coefficient < 1:
                    p.grad.mul_(coefficient)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            m = SCHEDULE["momentum"]
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(m).add_((1 - m) * ps.detach())
            center.mul_(0.9).add_(0.1 * torch.cat(teacher_out).mean(dim=0, keepdim=True))
        return loss.item()

    return step, 0


def worker(args):
    """Runs one variant and prints a JSON line: images/s, step seconds, peak memory and the anchor's
    weights in MiB."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    frozen_forward, anchor_bytes, trainable, checkpoint_bytes = None, 0, 0, 0
    rss_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.worker in ("lora", "full"):
        step, trainable = continued(args, device, lora=args.worker == "lora")
    elif args.worker == "baseline":
        step, anchor_bytes = baseline(args, device)
    elif args.worker == "distill_multi":
        step, frozen_forward = distilled_from_two(args, device)
    elif args.worker in ("distill", "distill_ema_copy"):
        step, frozen_forward, checkpoint_bytes = distilled(args, device, ema_copy=args.worker == "distill_ema_copy")
    elif args.worker == "dino_student":
        args.model = DISTILL_STUDENT
        step, anchor_bytes = ours(args, device)
    else:
        step, anchor_bytes = ours(args, device, args.worker)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = _seconds(step, args, cuda)
    if cuda:
        memory = (torch.cuda.max_memory_allocated() - held) / 2**20
        total = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
        total = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_at_start) / 1024
    frozen_seconds = _seconds(frozen_forward, args, cuda) if frozen_forward is not None else 0.0
    print(
        json.dumps(
            {
                "images_per_second": args.batch / seconds,
                "step_seconds": seconds,
                "memory_mib": memory,
                "anchor_mib": anchor_bytes / 2**20,
                "frozen_share": frozen_seconds / seconds,
                "total_mib": total,
                "trainable_millions": trainable / 1e6,
                "checkpoint_mib": checkpoint_bytes / 2**20,
            }
        )
    )


def _seconds(function, args, cuda: bool) -> float:
    """Seconds of one call of `function`, after `args.warmup` untimed calls, over `args.steps` calls."""
    for _ in range(args.warmup):
        function()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        function()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16", help="a DinoModel preset")
    parser.add_argument("--batch", type=int, default=None, help="images per step (CPU 4, GPU 128)")
    parser.add_argument("--local_crops", type=int, default=8)
    parser.add_argument("--global_size", type=int, default=224, help="side of the 2 global crops")
    parser.add_argument("--local_size", type=int, default=96, help="side of the local crops")
    parser.add_argument("--out_dim", type=int, default=65536)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (CPU 1, GPU 5)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (CPU 1, GPU 20)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each variant, alternating (CPU 2, GPU 1)")
    parser.add_argument("--torch_compile", action="store_true", help="compile our backbone and head")
    parser.add_argument(
        "--anchor",
        action="store_true",
        help="compare our step with anchoring on (Gram loss and cosine term, weights 1) to our step without it",
    )
    parser.add_argument(
        "--ibot",
        action="store_true",
        help="compare our step with iBOT, and with iBOT and the Gram loss, to our step with DINO alone",
    )
    parser.add_argument(
        "--distill",
        action="store_true",
        help="compare a distillation step (ViT-S/16 frozen model, ResNet-18 student, one view) to DINO's step of "
        "the same student",
    )
    parser.add_argument(
        "--distill_multi",
        action="store_true",
        help="compare a step distilling two frozen models (ViT-S/16 and ViT-B/16) into a ResNet-18 with the "
        "one-teacher step (ViT-S/16 alone); the second teacher's forward is timed apart",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="compare a continued-pretraining step with the Gram anchor through LoRA (rank 64, last block unfrozen) "
        "to the same step training the whole backbone, for each of --models",
    )
    parser.add_argument(
        "--cpu_bf16",
        action="store_true",
        help="on the CPU, bf16 autocast through Accelerate as on a GPU (the configs' mixed_precision: bf16; for CPUs "
        "with native bf16, see benchmarks/cpu_mixed_precision.py)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["vit_base_patch16", "vit_large_patch16"],
        help="the DinoModel presets of --lora",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (CPU default 1: on shared cores more threads wait on each other)",
    )
    parser.add_argument(
        "--worker",
        choices=[
            "ours",
            "anchored",
            "ibot",
            "ibot_gram",
            "baseline",
            "distill",
            "distill_ema_copy",
            "distill_multi",
            "dino_student",
            "lora",
            "full",
        ],
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.batch = args.batch or (8 if args.distill or args.distill_multi else 128 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.steps = args.steps or (20 if cuda else 1)
    args.repeats = args.repeats or (1 if cuda else 2)
    args.threads = args.threads or (None if cuda else 1)
    if args.worker:
        return worker(args)

    if args.lora:
        for model in args.models:
            args.model = model
            _compare(args, cuda, [("lora", "LoRA"), ("full", "full")], [sys.argv[0], *_without_models(sys.argv[1:])])
        return
    _compare(args, cuda, _columns(args), sys.argv)


def _without_models(argv: list[str]) -> list[str]:
    """`argv` without `--models NAME...` (each worker gets its one model as `--model`)."""
    if "--models" not in argv:
        return argv
    start = argv.index("--models")
    end = start + 1
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return argv[:start] + argv[end:]


def _columns(args) -> list[tuple[str, str]]:
    """(variant, column title) of the columns; each ratio is a column's figure over the last column's."""
    if args.anchor:
        return [("anchored", "+ anchor"), ("ours", "dino_hf")]
    if args.ibot:
        return [("ibot", "+ iBOT"), ("ibot_gram", "+ iBOT + Gram"), ("ours", "DINO alone")]
    if args.distill:
        return [("distill", "distillation"), ("dino_student", "DINO"), ("distill_ema_copy", "+ EMA copy")]
    if args.distill_multi:
        return [("distill_multi", "two teachers"), ("distill", "one teacher")]
    return [("ours", "dino_hf"), ("baseline", "baseline")]


def _compare(args, cuda: bool, columns: list[tuple[str, str]], argv: list[str]) -> None:
    """Runs each column's worker `args.repeats` times and prints the table."""
    hardware = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} thread(s)"
    precision = "bf16 autocast" if cuda or args.cpu_bf16 else "fp32"
    if args.distill:
        args.model = f"{DISTILL_FROZEN} frozen model into a ResNet-18 (one view) vs DINO's step of the ResNet-18"
    if args.distill_multi:
        frozen = f"{DISTILL_FROZEN} and {DISTILL_SECOND}"
        args.model = f"{frozen} frozen models into a ResNet-18 (one view) vs {DISTILL_FROZEN} alone"
    print(
        f"{args.model}, 2 x {args.global_size} + {args.local_crops} x {args.local_size} crops, "
        f"out_dim {args.out_dim}, batch {args.batch}, "
        f"best of {args.repeats} x ({args.warmup} warm-up + {args.steps} timed steps), {hardware}; ours {precision}"
        f"{' + torch.compile' if args.torch_compile else ''}"
        f"{', with and without anchoring' if args.anchor else ''}{', with and without iBOT' if args.ibot else ''}"
        f"{'' if args.anchor or args.ibot or args.distill or args.distill_multi or args.lora else ', baseline fp32'}"
    )
    results = {}
    for _ in range(args.repeats):
        for variant, _title in columns:
            model = ["--model", args.model] if args.lora else []  # --lora's workers get one of --models each
            command = [sys.executable, __file__, "--worker", variant, *model] + argv[1:]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            if variant not in results or run["step_seconds"] < results[variant]["step_seconds"]:
                results[variant] = run
    memory = "peak GPU memory of the step (MiB)" if cuda else "peak RSS rise during the steps (MiB)"
    for run in results.values():
        run["steps_per_second"] = 1 / run["step_seconds"]
    rows = [
        ("images/s", "images_per_second", "{:.2f}"),
        ("steps/s", "steps_per_second", "{:.2f}"),
        ("seconds/step", "step_seconds", "{:.3f}"),
        (memory, "memory_mib", "{:.0f}"),
    ]
    if args.anchor:
        rows.append(("anchor weights (MiB)", "anchor_mib", "{:.1f}"))
    if args.distill:
        whole = "peak GPU memory of the run (MiB)" if cuda else "peak RSS rise of the run (MiB)"
        rows += [
            ("frozen model's share of the step", "frozen_share", "{:.2f}"),
            (whole, "total_mib", "{:.0f}"),
            ("checkpoint weight files (MiB)", "checkpoint_mib", "{:.1f}"),
        ]
    if args.distill_multi:
        rows.append(("second teacher's forward, share of the step", "frozen_share", "{:.2f}"))
    if args.lora:
        whole = "peak GPU memory of the run (MiB)" if cuda else "peak RSS rise of the run (MiB)"
        rows += [(whole, "total_mib", "{:.0f}"), ("trainable backbone parameters (M)", "trainable_millions", "{:.2f}")]
    reference = columns[-1][0]
    titles = "".join(f" {title:>13s}" for _, title in columns)
    ratios = "".join(f" {'ratio ' + str(i + 1):>8s}" for i in range(len(columns) - 1))
    print(f"{'':38s}{titles}{ratios}")
    for label, key, fmt in rows:
        values = [results[variant][key] for variant, _ in columns]
        base = results[reference][key]
        cells = "".join(f" {fmt.format(value):>13s}" for value in values)
        cells += "".join(f" {f'{value / base:6.2f}x' if base else '':>8s}" for value in values[:-1])
        print(f"{label:38s}{cells}")
    if len(columns) > 2:
        print("ratio i: column i over the last column")
    if args.distill_multi:
        two, one = results["distill_multi"], results["distill"]
        budget = one["step_seconds"] + two["frozen_share"] * two["step_seconds"]
        print(
            f"the one-teacher step plus the second teacher's forward: {budget:.3f} s; the two-teacher step: "
            f"{two['step_seconds']:.3f} s ({two['step_seconds'] / budget:.2f}x)"
        )


if __name__ == "__main__":
    main()
