"""The LoRA settings of a run (the backbone trained through low-rank factors), and their checks."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .checks import fail

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


@dataclass
class LoraArguments:
    """LoRA on the backbone (ExPLoRA, docs/recipe.md#lora-explora)."""

    lora_rank: int = field(
        default=0,
        metadata={
            "help": "Rank r of the LoRA factors (peft) on the attention projections of the backbone's frozen blocks; "
            "everything else in the backbone is frozen except --unfreeze_last_blocks and the norm layers "
            "(ExPLoRA: 64). 0 turns LoRA off and trains the whole backbone."
        },
    )
    lora_alpha: float | None = field(
        default=None,
        metadata={"help": "LoRA's alpha: the update is alpha / r x B A. Unset: alpha = r (a scale of 1)."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the LoRA factors."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names (the last part) of the Linear layers that get LoRA factors. Unset: the family's query "
            "and value projections (q_proj v_proj for transformers ViT, DeiT, Dinov2 and DINOv3; qkv for timm; "
            "query value for DinoModel)."
        },
    )
    unfreeze_last_blocks: int = field(
        default=0,
        metadata={
            "help": "With --lora_rank: the last N blocks train fully, without LoRA (ExPLoRA: 1, the last block)."
        },
    )
    push_adapter: bool = field(
        default=False,
        metadata={"help": "With --push_to_hub and --lora_rank: also upload the peft adapter (teacher_adapter/)."},
    )


def lora_on(args: "DinoTrainingArguments") -> bool:
    """Whether the backbone trains through LoRA factors (`--lora_rank`)."""
    return args.lora_rank > 0


def check_lora(args: "DinoTrainingArguments") -> None:
    """LoRA's options: set only with `--lora_rank`, and not beside what would hold a second copy of the frozen
    weights or freeze them otherwise (the family of the backbone is checked once it is built)."""
    if args.lora_rank < 0:
        fail("lora_rank", args.lora_rank, "a rank >= 1 (ExPLoRA: 64), or 0 to train the whole backbone")
    if not lora_on(args):
        unset = {"lora_alpha": None, "lora_dropout": 0.0, "lora_target_modules": None, "unfreeze_last_blocks": 0}
        unset["push_adapter"] = False
        for name, default in unset.items():
            if getattr(args, name) != default:
                fail(name, getattr(args, name), "leave it unset, or turn LoRA on with --lora_rank R")
        return
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        fail("lora_alpha", args.lora_alpha, "a value > 0, or unset (alpha = rank)")
    if not 0 <= args.lora_dropout < 1:
        fail("lora_dropout", args.lora_dropout, "a probability in [0, 1)")
    if args.unfreeze_last_blocks < 0:
        fail("unfreeze_last_blocks", args.unfreeze_last_blocks, "a number of blocks >= 0")
    refused = {
        "freeze_blocks": (0, "0 with --lora_rank: LoRA already freezes the base weights"),
        "gram_teacher": ("start", "start with --lora_rank: an EMA Gram teacher would be a second copy of the weights"),
        "distill_from": (None, "unset with --lora_rank: LoRA adapts the DINO student of a continued pretraining"),
        "init_from_checkpoint": (
            None,
            "unset with --lora_rank: start from the checkpoint's teacher_backbone folder with --model_name_or_path",
        ),
    }
    for name, (allowed, fix) in refused.items():
        if getattr(args, name) != allowed:
            fail(name, getattr(args, name), fix)
    if args.push_adapter and not args.push_to_hub:
        fail("push_adapter", True, "set with --push_to_hub (the adapter goes beside the merged export)")


__all__ = ["LoraArguments", "check_lora", "lora_on"]
