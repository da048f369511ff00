"""The step plan of a run: how many steps, when each schedule warms up, and this step's values.

Every schedule runs per iteration (docs/recipe.md#schedules): the epoch-based settings of the
arguments (`warmup_epochs`, `warmup_teacher_temp_epochs`, `freeze_last_layer`, `num_train_epochs`)
become step counts here, once, from the number of images an epoch holds and the total batch.
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
from accelerate.utils import parse_flag_from_env

from ..objectives.anchor import GramSnapshots, gram_weight_at
from .arguments import DinoTrainingArguments, dino_on, model_spec
from .networks import has_trained_weights
from .objectives import gram_snapshots
from .schedules import (
    backbone_lr_factor_at,
    learning_rate_at,
    scaled_learning_rate,
    teacher_momentum_at,
    teacher_temperature_at,
    weight_decay_at,
)
from .step import StepValues


@dataclass(frozen=True)
class TrainingPlan:
    """Step counts and the schedules' constants of one run (all processes together)."""

    args: DinoTrainingArguments
    total_batch: int  # images per optimisation step over all processes
    iterations_per_epoch: int
    total_steps: int  # the schedules' length
    last_step: int  # where this run stops (`max_train_steps` may stop it early)
    peak_lr: float
    lr_warmup_steps: int
    temp_warmup_steps: int
    freeze_last_layer_steps: int
    head_warmup_steps: int
    backbone_warmup_steps: int  # the backbone's own lr warm-up, after the head warm-up
    checkpoint_every: int
    gram_snapshots: GramSnapshots | None = None  # when the EMA Gram teacher is taken (--gram_teacher ema)
    # The weight decay at the first and the last step (--weight_decay_batchnorm for a student with BatchNorm).
    weight_decays: tuple[float, float] | None = None
    batchnorm: bool = False  # the student has BatchNorm layers

    @classmethod
    def from_args(
        cls,
        args: DinoTrainingArguments,
        samples_per_epoch: int | None,
        num_processes: int,
        fresh_head: bool,
        batchnorm: bool = False,
    ) -> "TrainingPlan":
        """The plan of a run of `samples_per_epoch` images an epoch on `num_processes` processes; `fresh_head`:
        a head warm-up is due; `batchnorm`: the student has BatchNorm layers (`--weight_decay_batchnorm`)."""
        if samples_per_epoch is None:
            raise ValueError(
                "the length of this stream is unknown: pass --samples_per_epoch (images per epoch) so that the "
                "schedules can be laid out"
            )
        total_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes
        iterations = max(1, samples_per_epoch // total_batch)
        total_steps = max(2, args.max_steps or round(args.num_train_epochs * iterations))
        lr_warmup_steps = min(round(args.warmup_epochs * iterations), total_steps - 1)
        if args.warmup_fraction is not None:  # the shorter of the epochs and the share of the run
            lr_warmup_steps = min(lr_warmup_steps, round(args.warmup_fraction * total_steps))
        head_warmup_steps = args.head_warmup_steps if fresh_head else 0
        backbone_warmup_steps = args.backbone_warmup_steps
        if backbone_warmup_steps is None:  # the lr warm-up's length after a head warm-up, none without one
            backbone_warmup_steps = lr_warmup_steps if head_warmup_steps else 0
        return cls(
            args=args,
            total_batch=total_batch,
            iterations_per_epoch=iterations,
            total_steps=total_steps,
            last_step=min(total_steps, args.max_train_steps or total_steps),
            peak_lr=scaled_learning_rate(args.learning_rate, total_batch, args.lr_scaling),
            lr_warmup_steps=lr_warmup_steps,
            temp_warmup_steps=round(args.warmup_teacher_temp_epochs * iterations),
            freeze_last_layer_steps=round(args.freeze_last_layer * iterations),
            head_warmup_steps=head_warmup_steps,
            backbone_warmup_steps=backbone_warmup_steps,
            checkpoint_every=iterations if args.checkpoint_every_epoch else int(args.checkpointing_steps),
            gram_snapshots=gram_snapshots(args),
            weight_decays=_weight_decays(args, batchnorm),
            batchnorm=batchnorm,
        )

    def schedule(self, step: int) -> dict[str, float]:
        """The schedules' values at `step`: lr, weight decay, teacher momentum and temperature, and the
        backbone's lr factor when the backbone has a schedule of its own (a head warm-up or a backbone
        warm-up). The added terms' weights are `term_weights`."""
        args = self.args
        values = {
            "lr": learning_rate_at(step, self.total_steps, self.peak_lr, args.min_lr, self.lr_warmup_steps),
            "weight_decay": weight_decay_at(
                step, self.total_steps, *(self.weight_decays or (args.weight_decay, args.weight_decay_end))
            ),
            "momentum": teacher_momentum_at(step, self.total_steps, args.momentum_teacher),
            "teacher_temp": teacher_temperature_at(
                step, self.temp_warmup_steps, args.warmup_teacher_temp, args.teacher_temp
            ),
        }
        if self.head_warmup_steps or self.backbone_warmup_steps:
            values["backbone_lr_factor"] = backbone_lr_factor_at(
                step, self.head_warmup_steps, self.backbone_warmup_steps
            )
        return values

    def logged_schedule(self, step: int) -> dict[str, float]:
        """The schedules' values at `step` that mean something in this run, as a logging step shows them: the
        teacher temperature only with the DINO loss, the teacher momentum only with an EMA network (the DINO
        teacher, or the EMA student of a distillation run)."""
        values = self.schedule(step)
        if not dino_on(self.args):
            del values["teacher_temp"]
            if not self.args.distill_ema_student:
                del values["momentum"]
        return values

    def step_values(self, step: int) -> StepValues:
        """What `train_step` takes at `step`: the schedules' values and this step's options."""
        return StepValues(
            **self.schedule(step),
            clip_grad=self.args.clip_grad,
            freeze_last_layer=step < self.freeze_last_layer_steps,
            freeze_backbone=step < self.head_warmup_steps,
            dino_weight=self.args.dino_loss_weight,
            # The diagnostics are only read when the step after this one is logged.
            diagnostics=(step + 1) % self.args.logging_steps == 0 or step + 1 == self.last_step,
        )

    def term_weights(self, step: int) -> dict[str, float]:
        """The weights at `step` of the terms added to the DINO loss, by the names they log: KoLeo, the anchor's
        Gram loss (its warm-up from `--gram_start_step`; 0 before the first snapshot of an EMA Gram teacher,
        `GramSnapshots`) and cosine term, and iBOT."""
        args = self.args
        gram = 0.0
        if args.gram_loss_weight:
            gram = gram_weight_at(step, args.gram_warmup_steps, args.gram_loss_weight, start_step=args.gram_start_step)
        return {
            "koleo": args.koleo_weight,
            "gram": gram,
            "anchor_cos": args.anchor_cosine_weight,
            "ibot": args.ibot_loss_weight,
        }

    def epoch(self, step: int) -> float:
        return step / self.iterations_per_epoch

    def backbone_steps(self) -> int:
        """Steps of this run in which the backbone trains (the others train the fresh head alone)."""
        return max(0, self.last_step - self.head_warmup_steps)

    def notes(self) -> list[str]:
        """Sentences for the plan line: each setting that the others leave without effect, or that makes
        this run other than its name promises (a backbone that never trains, an lr that never leaves its
        warm-up), with what to change; and the precision, where the machine changes it."""
        notes = [*self._backbone_notes(), *self._warmup_notes(), *self._temperature_notes()]
        if unguarded(self.args):
            notes.append(
                "nothing guards the result: a run from trained weights can end below its start (DINOv2 issue "
                "#204), and without an evaluation set it cannot tell; add --eval_train_dir DIR (train/ and "
                "validation/ folders of labelled images) and --eval_steps N for the k-NN guard, which keeps the "
                "best export"
            )
        if self.batchnorm and self.args.weight_decay_batchnorm is not None:
            notes.append(
                f"the student has BatchNorm layers: weight decay {self.args.weight_decay_batchnorm:g} throughout "
                "(--weight_decay_batchnorm, LightlyTrain's for such students) instead of --weight_decay"
            )
        precision = precision_note(self.args)
        return notes + [precision] if precision else notes

    def _backbone_notes(self) -> list[str]:
        args, steps = self.args, self.last_step
        if args.head_warmup_steps and not self.head_warmup_steps:
            return [f"--head_warmup_steps {args.head_warmup_steps} has no effect: {_no_fresh_head(args)}"]
        if not self.head_warmup_steps:
            return []
        trained = self.backbone_steps()
        if not trained:
            return [
                f"the backbone trains 0 of {steps} steps (--head_warmup_steps {self.head_warmup_steps} covers the "
                f"whole run): only the DINO head trains and the result is a head-only teacher; to train the "
                f"backbone, set --head_warmup_steps below {steps} (e.g. {max(1, steps // 10)}) or train longer"
            ]
        note = f"the backbone trains {trained} of {steps} steps, after {self.head_warmup_steps} of the head alone"
        if self.head_warmup_steps + self.backbone_warmup_steps > steps:
            note += (
                f"; its lr warm-up (--backbone_warmup_steps {self.backbone_warmup_steps}) does not end within the "
                "run: shorten it or train longer"
            )
        return [note]

    def _warmup_notes(self) -> list[str]:
        args, steps = self.args, self.last_step
        notes = []
        if self.lr_warmup_steps and self.lr_warmup_steps >= steps - 1:
            epochs = round(0.1 * steps / self.iterations_per_epoch, 2)
            notes.append(
                f"the lr warm-up (--warmup_epochs {args.warmup_epochs}: {self.lr_warmup_steps} steps) covers the "
                f"whole run of {steps} steps: the lr rises to the end and never decays; set --warmup_epochs "
                f"{epochs} (a tenth of the run) or train longer"
            )
        if self.freeze_last_layer_steps >= steps and dino_on(args):
            notes.append(
                f"the head's last layer is frozen for the whole run (--freeze_last_layer {args.freeze_last_layer} "
                f"epochs: {self.freeze_last_layer_steps} steps of {steps}); lower --freeze_last_layer"
            )
        return notes

    def _temperature_notes(self) -> list[str]:
        args = self.args
        if not dino_on(args):  # no teacher temperature without the DINO loss
            return []
        # The default starting temperature (0.04) is no one's setting: it goes unused whenever a recipe sets
        # --teacher_temp without a warm-up.
        default = next(f.default for f in dataclasses.fields(args) if f.name == "warmup_teacher_temp")
        unused = args.warmup_teacher_temp not in (args.teacher_temp, default)
        if self.temp_warmup_steps == 0 and unused:
            return [
                f"warmup_teacher_temp {args.warmup_teacher_temp} has no effect: the teacher temperature is "
                f"{args.teacher_temp} from the first step (warmup_teacher_temp_epochs "
                f"{args.warmup_teacher_temp_epochs} gives no warm-up step); set --warmup_teacher_temp_epochs for a "
                "warm-up, or leave warmup_teacher_temp out"
            ]
        if self.temp_warmup_steps >= self.last_step:
            return [
                f"the teacher temperature warm-up ({self.temp_warmup_steps} steps) covers the whole run of "
                f"{self.last_step} steps: --teacher_temp {args.teacher_temp} is never reached; lower "
                "--warmup_teacher_temp_epochs"
            ]
        return []


def unguarded(args: DinoTrainingArguments) -> bool:
    """Whether the run continues trained weights with the DINO loss and no evaluation set: nothing then tells
    whether its export is its start's equal or better."""
    evaluated = args.eval_dataset_name or args.eval_train_dir or args.demo
    return has_trained_weights(args) and dino_on(args) and not evaluated and not args.init_from_checkpoint


def _weight_decays(args: DinoTrainingArguments, batchnorm: bool) -> tuple[float, float]:
    if batchnorm and args.weight_decay_batchnorm is not None:
        return args.weight_decay_batchnorm, args.weight_decay_batchnorm
    return args.weight_decay, args.weight_decay_end


def _no_fresh_head(args: DinoTrainingArguments) -> str:
    """Why a run has no fresh head to warm up (`build_student_teacher` gives it only to trained weights)."""
    if args.init_from_checkpoint:
        return "--init_from_checkpoint brings the checkpoint's trained head"
    if not has_trained_weights(args):
        return f"{model_spec(args)} starts from random weights, the head with it"
    return f"{model_spec(args)} comes with its trained DINO head"


def head_only(args: DinoTrainingArguments, steps: int) -> bool:
    """Whether a run with `args` that did `steps` steps trained its fresh head alone, the backbone frozen
    throughout (the plan line said so before the first step). A reference checkpoint file may bring its
    head, and then has no head warm-up: it is not known here without reading the file, and not claimed."""
    reference_file = model_spec(args).endswith((".pth", ".pt", ".safetensors"))
    fresh_head = has_trained_weights(args) and not args.init_from_checkpoint and not reference_file
    return fresh_head and steps <= args.head_warmup_steps


def requested_mixed_precision(args: DinoTrainingArguments) -> str:
    """`--mixed_precision`, else Accelerate's own setting (`accelerate launch --mixed_precision`, its config)."""
    return args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 autocast is faster than fp32,
    elsewhere it is emulated and several times slower (benchmarks/cpu_mixed_precision.py)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def run_mixed_precision(args: DinoTrainingArguments) -> str | None:
    """The mixed precision the run's Accelerator takes: the one asked for (None: Accelerate's own setting),
    except on a machine without a GPU, where fp16 runs in fp32 (Accelerate has no fp16 on the CPU) and bf16
    runs in fp32 unless the CPU computes bf16 natively (`cpu_has_bf16`)."""
    requested = requested_mixed_precision(args)
    on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()
    if on_cpu and (requested == "fp16" or (requested == "bf16" and not cpu_has_bf16())):
        return "no"
    return args.mixed_precision


def precision_note(args: DinoTrainingArguments) -> str | None:
    """The plan line's sentence when the machine changes the precision asked for, else None."""
    requested = requested_mixed_precision(args)
    if run_mixed_precision(args) != "no" or requested == "no":
        return None
    if requested == "fp16":
        why = "Accelerate has no fp16 autocast on the CPU"
    else:
        why = "this CPU has no bf16 instructions, so bf16 autocast would run several times slower"
    return f"mixed precision {requested} asked but there is no GPU: the run computes in fp32 ({why})"


__all__ = ["TrainingPlan", "cpu_has_bf16", "head_only", "precision_note", "run_mixed_precision", "unguarded"]
