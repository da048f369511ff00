"""The optimisation settings of a run, and their checks."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..optimization import OPTIMIZERS
from .checks import check_ranges, fail

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


@dataclass
class OptimisationArguments:
    """The optimiser, its schedules and the run's length; the head's and the backbone's warm-ups, layer decay and
    frozen blocks of continued pretraining."""

    head_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Continued pretraining from weights without a head: train the fresh head alone, backbone "
            "frozen, for this many optimisation steps before the backbone joins."
        },
    )
    backbone_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Steps of the backbone's own linear lr warm-up from 0, after the head warm-up: its lr is the "
            "global schedule's times a factor that rises from 0 to 1 over these steps. Unset: the length of the "
            "lr warm-up (--warmup_epochs) when there is a head warm-up, else 0 (the paper's schedule); 0 joins "
            "the global schedule at once."
        },
    )
    layer_decay: float = field(
        default=1.0,
        metadata={
            "help": "Layer-wise lr decay: block i (0-based) of L trains at lr x layer_decay^(L - i), the patch "
            "embedding and tokens at layer_decay^(L + 1), the final norm and head at x 1 (DINOv2 / DINOv3: 0.9); "
            "1.0 turns it off. ConvNeXt and Swin count their blocks over all stages."
        },
    )
    patch_embed_lr_mult: float = field(
        default=1.0,
        metadata={
            "help": "Extra lr multiplier of the patch embedding (a CNN's stem) (DINOv2 / DINOv3: 0.2); 1.0 turns "
            "it off."
        },
    )
    freeze_blocks: int = field(
        default=0,
        metadata={
            "help": "Freeze the patch embedding (with the CLS, position and register tokens) and the first N "
            "blocks of a ViT, or the first N stages of a hierarchical model (ConvNeXt, Swin, ResNet); they are "
            "not trained and the teacher keeps them. 0 freezes nothing."
        },
    )
    optimizer: Literal["adamw", "sgd", "lars"] = field(
        default="adamw", metadata={"help": "adamw, or sgd / lars for ResNets."}
    )
    learning_rate: float = field(
        default=0.0005,
        metadata={
            "help": "Peak learning rate for a total batch of 256 (linear), of 1024 (sqrt_wrt_1024) or of 1536 "
            "(sqrt_wrt_1536)."
        },
    )
    lr_scaling: Literal["linear", "sqrt_wrt_1024", "sqrt_wrt_1536"] = field(
        default="linear",
        metadata={
            "help": "How --learning_rate scales with the total batch B: linear (DINO): x B / 256; sqrt_wrt_1024 "
            "(DINOv2, DINOv3): x sqrt(B / 1024); sqrt_wrt_1536 (LightlyTrain's distillation): x sqrt(B / 1536)."
        },
    )
    min_lr: float = field(default=1e-6, metadata={"help": "Learning rate at the end of the cosine schedule."})
    warmup_epochs: float = field(default=10, metadata={"help": "Epochs of linear learning-rate warm-up from 0."})
    warmup_fraction: float | None = field(
        default=None,
        metadata={
            "help": "At most this share of the run's steps for the lr warm-up: the warm-up is the shorter of "
            "--warmup_epochs and this (LightlyTrain: 10 epochs or 0.1 of the run). Unset: --warmup_epochs alone."
        },
    )
    weight_decay: float = field(default=0.04, metadata={"help": "Weight decay at step 0 (cosine schedule)."})
    weight_decay_end: float = field(default=0.4, metadata={"help": "Weight decay at the last step."})
    weight_decay_batchnorm: float | None = field(
        default=None,
        metadata={
            "help": "Weight decay, start and end, of a student with BatchNorm layers (a ResNet): LightlyTrain "
            "distils such CNNs at 1e-6. Unset: --weight_decay and --weight_decay_end whatever the student."
        },
    )
    clip_grad: float = field(default=3.0, metadata={"help": "Per-parameter gradient norm clip; 0 turns it off."})
    freeze_last_layer: float = field(
        default=1, metadata={"help": "Epochs during which the head's last layer gets no gradient."}
    )
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Images per process per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimisation step."})
    num_train_epochs: float = field(default=100, metadata={"help": "Epochs to train."})
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "Train for this many optimisation steps whatever the dataset's size (overrides "
            "num_train_epochs, as transformers' max_steps; the schedules span these steps)."
        },
    )
    max_train_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimisation steps (schedules still span all epochs)."}
    )
    samples_per_epoch: int | None = field(
        default=None, metadata={"help": "Images per epoch for a stream of unknown length (else the dataset's size)."}
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Overrides accelerate's setting; bf16 or no avoid fp16's NaNs on ViT-S/8."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})


def check_optimisation(args: "DinoTrainingArguments") -> None:
    """The optimiser, its schedules and the continued-pretraining options of the optimiser (layer decay,
    freezing, the head's and the backbone's warm-ups); whether the backbone's family has a known layout is
    checked once it is built."""
    check_ranges(
        args,
        positive=("per_device_train_batch_size", "gradient_accumulation_steps"),
        non_negative=(
            "learning_rate",
            "min_lr",
            "warmup_epochs",
            "weight_decay",
            "weight_decay_end",
            "clip_grad",
            "freeze_last_layer",
            "head_warmup_steps",
        ),
        positive_or_unset=("max_steps", "max_train_steps", "samples_per_epoch"),
    )
    if args.num_train_epochs <= 0:
        fail("num_train_epochs", args.num_train_epochs, "a number > 0")
    if args.weight_decay_batchnorm is not None and args.weight_decay_batchnorm < 0:
        fail("weight_decay_batchnorm", args.weight_decay_batchnorm, "a weight decay >= 0, e.g. 1e-6, or unset")
    if args.warmup_fraction is not None and not 0 <= args.warmup_fraction < 1:
        fail("warmup_fraction", args.warmup_fraction, "a share of the run in [0, 1), e.g. 0.1, or unset")
    if args.optimizer not in OPTIMIZERS:
        fail("optimizer", args.optimizer, f"one of {', '.join(OPTIMIZERS)}")
    if args.mixed_precision not in (None, "no", "fp16", "bf16"):
        fail("mixed_precision", args.mixed_precision, "no, fp16 or bf16 (or unset: accelerate's setting)")
    if not 0 < args.layer_decay <= 1:
        fail("layer_decay", args.layer_decay, "a factor in (0, 1]: 1.0 turns it off, DINOv2 uses 0.9")
    if args.patch_embed_lr_mult <= 0:
        fail(
            "patch_embed_lr_mult",
            args.patch_embed_lr_mult,
            "a multiplier > 0 (DINOv2 uses 0.2); freeze the patch embedding with --freeze_blocks",
        )
    if args.freeze_blocks < 0:
        fail("freeze_blocks", args.freeze_blocks, "a number of blocks (ViT) or stages >= 0")
    if args.backbone_warmup_steps is not None and args.backbone_warmup_steps < 0:
        fail("backbone_warmup_steps", args.backbone_warmup_steps, "a number of steps >= 0, or leave it unset")


__all__ = ["OptimisationArguments", "check_optimisation"]
