"""The step plan of a run: how many steps, when each schedule warms up, and this step's values.

Every schedule runs per iteration (docs/recipe.md#schedules): the epoch-based settings of the
arguments (`warmup_epochs`, `warmup_teacher_temp_epochs`, `freeze_last_layer`, `num_train_epochs`)
become step counts here, once, from the number of images an epoch holds and the total batch.
"""

from dataclasses import dataclass

from .anchor import GramSnapshots, gram_weight_at
from .arguments import DinoTrainingArguments
from .schedules import (
    backbone_lr_factor_at,
    learning_rate_at,
    scaled_learning_rate,
    teacher_momentum_at,
    teacher_temperature_at,
    weight_decay_at,
)


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

    @classmethod
    def from_args(
        cls, args: DinoTrainingArguments, samples_per_epoch: int | None, num_processes: int, fresh_head: bool
    ) -> "TrainingPlan":
        if samples_per_epoch is None:
            raise ValueError(
                "the length of this stream is unknown: pass --samples_per_epoch (images per epoch) so that the "
                "schedules can be laid out"
            )
        total_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes
        iterations = max(1, samples_per_epoch // total_batch)
        total_steps = max(2, args.max_steps or round(args.num_train_epochs * iterations))
        lr_warmup_steps = min(round(args.warmup_epochs * iterations), total_steps - 1)
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
            gram_snapshots=GramSnapshots.from_args(args),
        )

    def schedule(self, step: int) -> dict[str, float]:
        """The schedules' values at `step`: lr, weight decay, teacher momentum and temperature, the
        Gram loss weight when Gram anchoring is on (0 before the first snapshot of an EMA Gram
        teacher, `GramSnapshots`), and the backbone's lr factor when the backbone
        has a schedule of its own (a head warm-up or a backbone warm-up)."""
        args = self.args
        values = {
            "lr": learning_rate_at(step, self.total_steps, self.peak_lr, args.min_lr, self.lr_warmup_steps),
            "weight_decay": weight_decay_at(step, self.total_steps, args.weight_decay, args.weight_decay_end),
            "momentum": teacher_momentum_at(step, self.total_steps, args.momentum_teacher),
            "teacher_temp": teacher_temperature_at(
                step, self.temp_warmup_steps, args.warmup_teacher_temp, args.teacher_temp
            ),
        }
        if args.gram_loss_weight:
            values["gram_weight"] = gram_weight_at(
                step, args.gram_warmup_steps, args.gram_loss_weight, start_step=args.gram_start_step
            )
        if self.head_warmup_steps or self.backbone_warmup_steps:
            values["backbone_lr_factor"] = backbone_lr_factor_at(
                step, self.head_warmup_steps, self.backbone_warmup_steps
            )
        return values

    def step_options(self, step: int) -> dict:
        """What `train_step` takes at `step` besides the schedules."""
        return {
            "clip_grad": self.args.clip_grad,
            "freeze_last_layer": step < self.freeze_last_layer_steps,
            "accumulation_steps": self.args.gradient_accumulation_steps,
            "freeze_backbone": step < self.head_warmup_steps,
            "koleo_weight": self.args.koleo_weight,
            "anchor_cosine_weight": self.args.anchor_cosine_weight,
            "ibot_weight": self.args.ibot_loss_weight,
            # The diagnostics are only read when the step after this one is logged.
            "diagnostics": (step + 1) % self.args.logging_steps == 0 or step + 1 == self.last_step,
        }

    def epoch(self, step: int) -> float:
        return step / self.iterations_per_epoch


__all__ = ["TrainingPlan"]
