"""The hyperparameters of a DINO pretraining run: one typed dataclass.

DINO's own hyperparameters keep the names and defaults of the reference implementation (ViT-S/16,
"vanilla" 100-epoch recipe, paper Sec. 3 and Appendix); the generic ones take the names of the Hugging
Face example scripts. `parse_training_args` reads them like those scripts do (transformers'
`HfArgumentParser`), with `--config FILE.yaml` setting defaults that command-line flags override.
"""

import argparse
import dataclasses
import difflib
import glob
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import timm
import yaml
from accelerate.utils import LoggerType
from transformers import HfArgumentParser

from ..command_line import unknown_flags_message
from ..models.backbones import MASKED_PATCH_MODELS
from ..models.configuration_dino import PRESETS, DinoConfig
from ..models.references import TIMM_PREFIX, is_external_timm_name, is_hub_id
from ..models.transformers_backbone import FAMILIES, MASKABLE, accepted_models_text, check_vision_config
from ..objectives.dino import CENTERINGS
from ..run_files.checkpoints import checkpoint_holding, is_checkpoint, named_checkpoint
from ..run_files.init_checkpoint import take_architecture
from .optimization import OPTIMIZERS

SECRET_FIELDS = ("hub_token",)
# The fields that name training data; any of them replaces the demo dataset that a config file asks for.
DATA_SOURCE_FIELDS = ("dataset_name", "train_dir", "data_files")


@dataclass
class DinoTrainingArguments:
    # ---- model -------------------------------------------------------------------------------
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "DinoModel preset (e.g. vit_small_patch16), a saved DinoModel / ViT folder, a Hub id, "
            "a reference DINO .pth checkpoint, or trained timm weights: timm:NAME (e.g. "
            "timm:vit_small_patch16_224.dino) or a folder saved by timm. Mutually exclusive with --backbone."
        },
    )
    backbone: str | None = field(
        default=None,
        metadata={"help": "A timm backbone as timm:NAME (e.g. timm:resnet50, timm:vit_small_patch16_224)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Fields of a DinoModel preset's DinoConfig to change when training it from scratch, as "
            "transformers' example scripts take them: comma-separated key=value, e.g. "
            "num_hidden_layers=6,intermediate_size=768. Only with a preset --model_name_or_path."
        },
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth of the student (reference 0.1)."})
    out_dim: int = field(default=65536, metadata={"help": "Number of prototypes K of the DINO head."})
    norm_last_layer: bool = field(
        default=True, metadata={"help": "Freeze the norm of the head's last layer at 1 (False in the boosted recipe)."}
    )
    use_bn_in_head: bool = field(default=False, metadata={"help": "BatchNorm after the head's hidden layers."})
    head_hidden_dim: int = field(default=2048, metadata={"help": "Hidden width of the DINO head."})
    head_bottleneck_dim: int = field(default=256, metadata={"help": "Bottleneck width of the DINO head."})
    head_nlayers: int = field(
        default=3,
        metadata={
            "help": "Linear layers of the head's MLP, the one into the bottleneck included "
            "(3: d -> 2048 -> 2048 -> 256)."
        },
    )
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

    # ---- DINO objective ----------------------------------------------------------------------
    momentum_teacher: float = field(
        default=0.996, metadata={"help": "Base EMA momentum of the teacher, cosine to 1 (0.9995 for batch 256)."}
    )
    teacher_temp: float = field(default=0.04, metadata={"help": "Teacher temperature after warm-up (<= 0.07)."})
    warmup_teacher_temp: float = field(default=0.04, metadata={"help": "Teacher temperature at step 0."})
    warmup_teacher_temp_epochs: float = field(
        default=0, metadata={"help": "Epochs of linear teacher temperature warm-up."}
    )
    student_temp: float = field(default=0.1, metadata={"help": "Student temperature."})
    center_momentum: float = field(default=0.9, metadata={"help": "EMA momentum of the teacher center."})

    # ---- small-data stabilisers (DINOv2, Oquab et al. 2023, Sec. 4), off by default ----------
    centering: Literal["center", "sinkhorn_knopp"] = field(
        default="center",
        metadata={
            "help": "How the teacher is centred: 'center' (the paper's running center, default) or "
            "'sinkhorn_knopp' (DINOv2's Sinkhorn-Knopp normalisation over the batch; the center is then "
            "not used)."
        },
    )
    sinkhorn_iterations: int = field(
        default=3, metadata={"help": "Sinkhorn-Knopp iterations with --centering sinkhorn_knopp (DINOv2: 3)."}
    )
    koleo_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the KoLeo regulariser on the student's backbone features of the global crops "
            "(DINOv2: 0.1); 0 turns it off."
        },
    )

    # ---- iBOT masked-patch loss (DINOv2 Sec. 3), off by default ------------------------------
    ibot_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of iBOT's masked-patch loss beside the DINO loss (DINOv2: 1.0): the student's global "
            "crops are block-masked with the backbone's mask token and its patch tokens predict the teacher's "
            "at the masked patches. Needs a ViT with a mask token (a DinoModel, or a transformers vit, deit, "
            "dinov2, dinov2_with_registers or dinov3_vit checkpoint); 0 turns it off."
        },
    )
    mask_ratio_min_max: list[float] = field(
        default_factory=lambda: [0.1, 0.5],
        metadata={"help": "Range of the fraction of patches a masked global crop hides (DINOv2: 0.1 0.5)."},
    )
    mask_sample_probability: float = field(
        default=0.5,
        metadata={"help": "Fraction of the global crops of a batch that are masked (DINOv2: 0.5)."},
    )
    ibot_separate_head: bool = field(
        default=False,
        metadata={
            "help": "Send the masked patch tokens through a head of their own, of the DINO head's shape (DINOv3); "
            "off, they share the DINO head (DINOv2)."
        },
    )

    # ---- anchoring to the starting weights (continued pretraining), off by default ------------
    gram_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of DINOv3's Gram anchoring loss: the patch-to-patch similarities of the student's "
            "global crops kept close to those of the Gram teacher (DINOv3 ramps it to 2.0); 0 turns it off."
        },
    )
    gram_warmup_steps: int = field(
        default=0,
        metadata={"help": "Steps over which the Gram loss weight ramps linearly from 0 (0: full weight at once)."},
    )
    gram_teacher: Literal["start", "ema"] = field(
        default="start",
        metadata={
            "help": "The Gram teacher: 'start', a frozen copy of the backbone taken before the first step (continued "
            "pretraining); or 'ema' (DINOv3), a snapshot of the EMA teacher's backbone taken at --gram_start_step "
            "and refreshed every --gram_update_steps; the Gram loss is off before the first snapshot. Saved with "
            "every checkpoint, so that a resumed run has the same Gram teacher."
        },
    )
    gram_start_step: int = field(
        default=0,
        metadata={
            "help": "--gram_teacher ema: the step before which the first snapshot of the EMA teacher is taken "
            "(DINOv3: 1M iterations); the Gram loss and its warm-up start there."
        },
    )
    gram_update_steps: int = field(
        default=0,
        metadata={
            "help": "--gram_teacher ema: refresh the snapshot every N steps after the first (DINOv3: 10000); 0 never "
            "refreshes it."
        },
    )
    gram_max_updates: int | None = field(
        default=None,
        metadata={"help": "--gram_teacher ema: refresh it at most this many times (DINOv3: 3); unset: no limit."},
    )
    gram_teacher_resolution_scale: float = field(
        default=1.0,
        metadata={
            "help": "DINOv3's high-resolution Gram teacher: it sees the global crops resized by this factor "
            "(bicubic), its patch-token map resized (bicubic) to the student's grid (DINOv3: 2.0); 1.0 is off. "
            "The crops' size times it must be a size the backbone takes (a multiple of a ViT's patch size)."
        },
    )
    gram_remove_neg: bool = field(
        default=False,
        metadata={"help": "Set the negative entries of both Gram matrices to 0 before their difference."},
    )
    anchor_cosine_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of 1 - cos(student feature, starting backbone's feature) of the global crops, against "
            "the same frozen copy as the Gram teacher; 0 turns it off."
        },
    )

    # ---- distillation from a frozen model (docs/distillation.md) --------------------------------
    distill_from: str | None = field(
        default=None,
        metadata={
            "help": "Distil this frozen model into the student: anything --model_name_or_path takes (a transformers "
            "vision folder or Hub id, timm:NAME with its trained weights, a timm or DinoModel folder, an export of "
            "dino_hf). It is never trained nor saved in checkpoints (its name and weight hash are). Unset: off."
        },
    )
    dino_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the DINO loss. 0 (the distillation recipe) trains the student on the distillation "
            "terms alone: no EMA teacher forward, no head, one view per image."
        },
    )
    distill_global_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the global term: KL of the softmax over a queue of the frozen model's features."},
    )
    distill_local_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the local term on the patch tokens (--distill_local_loss); 0 turns it off."},
    )
    distill_local_loss: Literal["similarity", "cosine"] = field(
        default="similarity",
        metadata={
            "help": "similarity: KL of each image's patch-to-patch similarity rows (LightlyTrain); cosine: direct "
            "regression of the frozen model's patch features (0.9 cosine + 0.1 smooth-L1, AM-RADIO style)."
        },
    )
    distill_projector: Literal["linear", "mlp"] = field(
        default="linear",
        metadata={
            "help": "The student's projectors to the frozen model's width: linear, or mlp (Linear, LayerNorm, "
            "GELU, Linear). Dropped at export."
        },
    )
    distill_queue_size: int | None = field(
        default=None,
        metadata={"help": "Features in the global term's queue. Unset: by the dataset size (16 to 8192)."},
    )
    distill_mixup: bool = field(
        default=False,
        metadata={"help": "Mix each batch's views with a shuffled copy, one U(0, 1) weight per batch (LightlyTrain)."},
    )
    distill_teacher_size: int | None = field(
        default=None,
        metadata={
            "help": "Resize the view for the frozen model to this side, e.g. 196 for a patch-14 model beside a "
            "patch-16 student at 224, so that the patch grids match 1:1. Unset: the view's own size."
        },
    )
    distill_ema_student: bool = field(
        default=False,
        metadata={
            "help": "Export an EMA of the student (momentum from --momentum_teacher to 1), as DINOv2 and DINOv3's "
            "distillations do, instead of the student itself."
        },
    )

    # ---- LoRA on the backbone (ExPLoRA, docs/recipe.md#lora-explora), off by default -------------
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

    # ---- optimisation ------------------------------------------------------------------------
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
    weight_decay: float = field(default=0.04, metadata={"help": "Weight decay at step 0 (cosine schedule)."})
    weight_decay_end: float = field(default=0.4, metadata={"help": "Weight decay at the last step."})
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

    # ---- multi-crop augmentation -------------------------------------------------------------
    global_crops_size: int = field(default=224, metadata={"help": "Size of the 2 global crops."})
    local_crops_size: int = field(default=96, metadata={"help": "Size of the local crops."})
    global_crops_scale: list[float] = field(default_factory=lambda: [0.4, 1.0], metadata={"help": "Area range."})
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.4], metadata={"help": "Area range."})
    local_crops_number: int = field(default=8, metadata={"help": "Number of local crops."})
    color_jitter: list[float] = field(
        default_factory=lambda: [0.4, 0.4, 0.2, 0.1],
        metadata={
            "help": "Colour jitter strengths: brightness, contrast, saturation (factors U(1 - s, 1 + s)) and hue "
            "(shift U(-h, h) in turns, h <= 0.5); raise them where colour tells images apart but not classes."
        },
    )
    color_jitter_p: float = field(default=0.8, metadata={"help": "Probability of a crop's colour jitter."})
    grayscale_p: float = field(default=0.2, metadata={"help": "Probability of a crop turning grayscale."})
    blur_sigma: list[float] = field(
        default_factory=lambda: [0.1, 2.0],
        metadata={"help": "Range of the Gaussian blur's sigma in pixels of the crop; scale it with small crops."},
    )
    blur_p: list[float] = field(
        default_factory=lambda: [1.0, 0.1, 0.5],
        metadata={"help": "Blur probabilities of global crop 1, global crop 2 and the local crops."},
    )
    solarize_p: float = field(default=0.2, metadata={"help": "Solarisation probability of global crop 2."})

    # ---- data --------------------------------------------------------------------------------
    demo: bool = field(
        default=False,
        metadata={
            "help": "Train on the procedurally generated demo dataset (made on first use). In a config file it "
            "gives way to --dataset_name, --train_dir or --data_files."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id or a local dataset script/folder."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_split: str = field(default="train", metadata={"help": "Split to pretrain on."})
    train_dir: str | None = field(default=None, metadata={"help": "A folder of images (flat or class sub-folders)."})
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Parquet / arrow files or webdataset .tar shards (local paths or hf:// URLs)."}
    )
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (found automatically)."})
    shuffle_buffer_size: int = field(default=10000, metadata={"help": "Shuffle buffer of the stream."})
    dataloader_num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per process."})
    max_image_pixels: int | None = field(
        default=None, metadata={"help": "Decompression-bomb limit in pixels (default: PIL's)."}
    )

    # ---- in-training k-NN evaluation ---------------------------------------------------------
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Labelled dataset for k-NN during training."}
    )
    eval_dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    eval_train_dir: str | None = field(
        default=None, metadata={"help": "Labelled image folder for k-NN (class sub-folders)."}
    )
    eval_train_split: str = field(default="train", metadata={"help": "k-NN memory bank split."})
    eval_split: str = field(default="validation", metadata={"help": "k-NN query split."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (found automatically)."})
    eval_steps: int | None = field(default=None, metadata={"help": "Run k-NN every this many steps (and at the end)."})
    eval_image_size: int | None = field(
        default=None, metadata={"help": "k-NN input size (default: global crop size)."}
    )
    stop_if_knn_drops: float | None = field(
        default=None,
        metadata={
            "help": "Stop the run (with a checkpoint and the final export, exit status 0) when the teacher's "
            "k-NN top-1 falls this many points below its best; the best teacher is kept as "
            "OUTPUT_DIR/teacher_backbone_best either way. Needs --eval_steps and an evaluation set. Unset: off."
        },
    )

    # ---- output, checkpoints, logging --------------------------------------------------------
    output_dir: str = field(default="outputs/dino", metadata={"help": "Where checkpoints and the export go."})
    checkpointing_steps: str = field(
        default="epoch", metadata={"help": "Save the training state every N steps, or 'epoch'."}
    )
    checkpoints_total_limit: int = field(default=3, metadata={"help": "Keep the last K checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    init_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Start a new run from the student, teacher, heads and center of a training checkpoint of "
            "this project (a checkpoint-<step> folder, or a run's OUTPUT_DIR for its newest): step 0, a fresh "
            "optimiser, this run's data and --output_dir. The model and head settings left unset are the "
            "checkpoint's. --resume_from_checkpoint continues the same run instead."
        },
    )
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N steps."})
    report_to: str = field(
        default="none", metadata={"help": "Trackers through Accelerate: none, all, tensorboard, wandb, ..."}
    )
    skip_nonfinite_steps: int = field(
        default=0, metadata={"help": "Steps with a non-finite loss to skip before stopping (0: stop at the first)."}
    )
    # ---- speed -------------------------------------------------------------------------------
    augment_on: str = field(
        default="cpu",
        metadata={
            "help": "Where the multi-crop augmentation runs: 'cpu' (in the DataLoader workers) or 'gpu' (the "
            "workers only decode and cap the image size; crops, resizes and colour ops run on the "
            "accelerator in batch)."
        },
    )
    augment_cap_size: int = field(
        default=288, metadata={"help": "With --augment_on gpu: side of the square images the workers send."}
    )
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the backbones and heads."})
    channels_last: bool = field(default=False, metadata={"help": "channels_last memory format (CNN backbones)."})

    log_sample_ids: str | None = field(
        default=None,
        metadata={
            "help": "Append the ids of every batch to this file, one JSON line per step and process "
            '({"step", "process", "ids"}): to check which samples each process saw, and that a resumed '
            "run reads on where the stopped one was."
        },
    )

    # ---- Hub ---------------------------------------------------------------------------------
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the teacher export at every checkpoint."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository, e.g. org/dino-vits16."})
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (default: the logged-in one). Never saved."}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository as private."})

    def __post_init__(self):
        self.global_crops_scale = [float(x) for x in self.global_crops_scale]
        self.local_crops_scale = [float(x) for x in self.local_crops_scale]
        self.color_jitter = [float(x) for x in self.color_jitter]
        self.blur_sigma = [float(x) for x in self.blur_sigma]
        self.blur_p = [float(x) for x in self.blur_p]
        self.mask_ratio_min_max = [float(x) for x in self.mask_ratio_min_max]
        if self.init_from_checkpoint:
            take_architecture(self)  # the networks to build are the checkpoint's
        validate(self)

    @property
    def checkpoint_every_epoch(self) -> bool:
        return self.checkpointing_steps == "epoch"

    @property
    def gram_teacher_crops_size(self) -> int:
        """The side of the global crops the Gram teacher sees (`--gram_teacher_resolution_scale`)."""
        return round(self.global_crops_size * self.gram_teacher_resolution_scale)

    def to_dict(self) -> dict:
        """The resolved configuration, secrets removed: what is saved next to every checkpoint."""
        values = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            values.pop(name, None)
        return values

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _fail(name: str, value, allowed: str) -> None:
    raise ValueError(f"--{name}={value!r} is not valid: {allowed}")


def check_crop_sizes(args: DinoTrainingArguments, patch_size: int | None) -> None:
    """Both crop sizes must be multiples of the ViT's patch size (`None`: a CNN, any size goes)."""
    if not patch_size:
        return
    sizes = [("global_crops_size", args.global_crops_size)]
    if args.local_crops_number:
        sizes.append(("local_crops_size", args.local_crops_size))
    for name, size in sizes:
        if size % patch_size:
            below = size - size % patch_size
            examples = f"{below} or {below + patch_size}" if below else str(patch_size)
            _fail(name, size, f"a multiple of the backbone's patch size {patch_size}, e.g. {examples}")
    size, scale = args.gram_teacher_crops_size, args.gram_teacher_resolution_scale
    if args.gram_loss_weight and scale != 1 and size % patch_size:
        _fail(
            "gram_teacher_resolution_scale",
            scale,
            f"the Gram teacher's crops of {args.global_crops_size} x {scale:g} = {size} px must be a multiple of the "
            f"backbone's patch size {patch_size}; e.g. 2.0 gives {2 * args.global_crops_size}",
        )


def validate(args: DinoTrainingArguments) -> None:
    """Check every field before any work starts; each error names the field, the value and what is allowed.

    Checks what can be known without building the model or reading data: ranges and choices, that
    local folders and files exist, that a backbone name is known, and the crop sizes against the
    patch size of a preset or saved DinoModel (`train` checks other backbones once built).
    """
    _validate_ranges(args)
    _validate_optimiser_options(args)
    _validate_choices(args)
    _validate_gram(args)
    _validate_model(args)
    _validate_ibot(args)
    _validate_distillation(args)
    _validate_lora(args)
    _validate_data(args)
    if args.push_to_hub and not args.hub_model_id:
        _fail("hub_model_id", None, "a repository id such as org/dino-vits16 (required by --push_to_hub)")


def _validate_ranges(args: DinoTrainingArguments) -> None:
    positive = (
        "out_dim",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "global_crops_size",
        "local_crops_size",
        "head_hidden_dim",
        "head_bottleneck_dim",
        "head_nlayers",
        "logging_steps",
        "checkpoints_total_limit",
        "shuffle_buffer_size",
        "augment_cap_size",
        "sinkhorn_iterations",
    )
    for name in positive:
        if getattr(args, name) < 1:
            _fail(name, getattr(args, name), "an integer >= 1")
    non_negative = (
        "learning_rate",
        "min_lr",
        "warmup_epochs",
        "weight_decay",
        "weight_decay_end",
        "clip_grad",
        "freeze_last_layer",
        "warmup_teacher_temp_epochs",
        "head_warmup_steps",
        "local_crops_number",
        "dataloader_num_workers",
        "skip_nonfinite_steps",
        "koleo_weight",
        "gram_loss_weight",
        "gram_warmup_steps",
        "anchor_cosine_weight",
        "ibot_loss_weight",
    )
    for name in non_negative:
        if getattr(args, name) < 0:
            _fail(name, getattr(args, name), "a number >= 0")
    for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
        if not 0 < getattr(args, name) <= 1:
            _fail(
                name,
                getattr(args, name),
                "a temperature in (0, 1]; DINO uses 0.04-0.07 for the teacher, 0.1 for the student",
            )
    for name in ("momentum_teacher", "center_momentum"):
        if not 0 <= getattr(args, name) <= 1:
            _fail(name, getattr(args, name), "a momentum in [0, 1]")
    if not 0 <= args.drop_path_rate < 1:
        _fail("drop_path_rate", args.drop_path_rate, "a rate in [0, 1)")
    if args.num_train_epochs <= 0:
        _fail("num_train_epochs", args.num_train_epochs, "a number > 0")
    for name in (
        "max_steps",
        "max_train_steps",
        "samples_per_epoch",
        "eval_steps",
        "eval_image_size",
        "max_image_pixels",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(name, value, "an integer >= 1, or leave it unset")
    _validate_augmentation(args)


def _validate_optimiser_options(args: DinoTrainingArguments) -> None:
    """The continued-pretraining options of the optimiser (layer decay, freezing, backbone warm-up);
    whether the backbone's family has a known layout is checked once it is built."""
    if not 0 < args.layer_decay <= 1:
        _fail("layer_decay", args.layer_decay, "a factor in (0, 1]: 1.0 turns it off, DINOv2 uses 0.9")
    if args.patch_embed_lr_mult <= 0:
        _fail(
            "patch_embed_lr_mult",
            args.patch_embed_lr_mult,
            "a multiplier > 0 (DINOv2 uses 0.2); freeze the patch embedding with --freeze_blocks",
        )
    if args.freeze_blocks < 0:
        _fail("freeze_blocks", args.freeze_blocks, "a number of blocks (ViT) or stages >= 0")
    if args.backbone_warmup_steps is not None and args.backbone_warmup_steps < 0:
        _fail("backbone_warmup_steps", args.backbone_warmup_steps, "a number of steps >= 0, or leave it unset")


def _validate_augmentation(args: DinoTrainingArguments) -> None:
    for name in ("global_crops_scale", "local_crops_scale"):
        scale = getattr(args, name)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            _fail(name, scale, "two numbers 0 < low <= high <= 1, e.g. 0.4 1.0")
    jitter = args.color_jitter
    if len(jitter) != 4 or not all(0 <= s <= 1 for s in jitter[:3]) or not 0 <= jitter[3] <= 0.5:
        _fail(
            "color_jitter",
            jitter,
            "four strengths: brightness, contrast, saturation in [0, 1] and hue in [0, 0.5], e.g. 0.4 0.4 0.2 0.1",
        )
    for name in ("color_jitter_p", "grayscale_p", "solarize_p"):
        if not 0 <= getattr(args, name) <= 1:
            _fail(name, getattr(args, name), "a probability in [0, 1]")
    if len(args.blur_sigma) != 2 or not 0 < args.blur_sigma[0] <= args.blur_sigma[1]:
        _fail("blur_sigma", args.blur_sigma, "two numbers 0 < low <= high, e.g. 0.1 2.0 (pixels)")
    if len(args.blur_p) != 3 or not all(0 <= p <= 1 for p in args.blur_p):
        _fail(
            "blur_p", args.blur_p, "three probabilities (global crop 1, global crop 2, local crops), e.g. 1.0 0.1 0.5"
        )


def _validate_choices(args: DinoTrainingArguments) -> None:
    if args.centering not in CENTERINGS:
        _fail("centering", args.centering, "center (the paper's running center) or sinkhorn_knopp (DINOv2)")
    if args.koleo_weight and args.per_device_train_batch_size < 2:
        _fail(
            "per_device_train_batch_size",
            args.per_device_train_batch_size,
            "at least 2 with --koleo_weight, which needs a nearest neighbour in each process's batch",
        )
    if args.augment_on not in ("cpu", "gpu"):
        _fail("augment_on", args.augment_on, "cpu or gpu")
    if args.optimizer not in OPTIMIZERS:
        _fail("optimizer", args.optimizer, f"one of {', '.join(OPTIMIZERS)}")
    if args.mixed_precision not in (None, "no", "fp16", "bf16"):
        _fail("mixed_precision", args.mixed_precision, "no, fp16 or bf16 (or unset: accelerate's setting)")
    trackers = [name.strip() for name in args.report_to.split(",")]
    known_trackers = ["none"] + [tracker.value for tracker in LoggerType]
    if any(name not in known_trackers for name in trackers) or ("none" in trackers and len(trackers) > 1):
        _fail("report_to", args.report_to, f"none, or a comma-separated list of {', '.join(known_trackers[1:])}")
    if args.checkpointing_steps != "epoch" and not (
        args.checkpointing_steps.isdigit() and int(args.checkpointing_steps) > 0
    ):
        _fail("checkpointing_steps", args.checkpointing_steps, "a number of steps >= 1, or 'epoch'")
    if args.resume_from_checkpoint not in (None, "latest"):
        named_checkpoint(
            args.resume_from_checkpoint,
            "resume_from_checkpoint",
            output_dir=Path(args.output_dir),
            also_accepted="'latest' (the newest valid checkpoint under --output_dir)",
        )


def _validate_gram(args: DinoTrainingArguments) -> None:
    """Gram anchoring's options (docs/recipe.md#ema-and-high-resolution-gram-teachers): the EMA Gram
    teacher's schedule only with `--gram_teacher ema`, the high-resolution Gram teacher only with the
    Gram loss."""
    if args.gram_teacher not in ("start", "ema"):
        _fail("gram_teacher", args.gram_teacher, "start (a frozen copy of the backbone before the first step) or ema")
    for name in ("gram_start_step", "gram_update_steps", "gram_max_updates"):
        value = getattr(args, name)
        if value is not None and value < 0:
            _fail(name, value, "a number of steps >= 0")
    if args.gram_teacher == "ema":
        if not args.gram_loss_weight:
            _fail("gram_teacher", "ema", "the EMA Gram teacher serves the Gram loss: set --gram_loss_weight > 0")
        if args.anchor_cosine_weight:
            _fail(
                "anchor_cosine_weight",
                args.anchor_cosine_weight,
                "0 with --gram_teacher ema: the cosine term anchors to the start (--gram_teacher start)",
            )
        if args.gram_max_updates is not None and not args.gram_update_steps:
            _fail("gram_max_updates", args.gram_max_updates, "set together with --gram_update_steps N (the refreshes)")
    else:
        for name, unset in (("gram_start_step", 0), ("gram_update_steps", 0), ("gram_max_updates", None)):
            if getattr(args, name) != unset:
                _fail(
                    name,
                    getattr(args, name),
                    "left unset with --gram_teacher start (taken once, before the first step); it schedules the "
                    "snapshots of --gram_teacher ema",
                )
    scale = args.gram_teacher_resolution_scale
    if scale != 1:
        if scale < 1 or not args.gram_loss_weight or args.anchor_cosine_weight:
            _fail(
                "gram_teacher_resolution_scale",
                scale,
                "a factor >= 1 (DINOv3: 2.0) with --gram_loss_weight > 0 and --anchor_cosine_weight 0 (the cosine "
                "term compares features at the student's resolution); 1.0 turns it off",
            )
        if not math.isclose(args.global_crops_size * scale, args.gram_teacher_crops_size, abs_tol=1e-6):
            _fail(
                "gram_teacher_resolution_scale",
                scale,
                f"a factor that makes the {args.global_crops_size} px global crops a whole number of pixels "
                f"(x {scale:g} gives {args.global_crops_size * scale:g}), e.g. 2.0",
            )


def _validate_ibot(args: DinoTrainingArguments) -> None:
    """iBOT's options: the mask settings, at least one masked crop per micro-batch, and a backbone with a
    mask token (what can be told from the arguments and a folder's config.json; `build_backbone`
    refuses the rest)."""
    if not args.ibot_loss_weight:
        if args.ibot_separate_head:
            _fail("ibot_separate_head", True, "set together with --ibot_loss_weight > 0 (it is iBOT's patch head)")
        return
    ratio = args.mask_ratio_min_max
    if len(ratio) != 2 or not 0 <= ratio[0] <= ratio[1] <= 1:
        _fail("mask_ratio_min_max", ratio, "two fractions 0 <= min <= max <= 1 of a crop's patches, e.g. 0.1 0.5")
    probability, crops = args.mask_sample_probability, 2 * args.per_device_train_batch_size
    if not 0 < probability <= 1 or int(crops * probability) < 1:
        _fail(
            "mask_sample_probability",
            probability,
            f"a fraction in (0, 1] that masks at least one of the {crops} global crops of a micro-batch "
            f"(int({crops} x p) >= 1, so p >= {1 / crops:g} with --per_device_train_batch_size "
            f"{args.per_device_train_batch_size}); DINOv2 uses 0.5",
        )
    unmaskable = _unmaskable_backbone(args)
    if unmaskable:
        raise ValueError(
            f"--ibot_loss_weight={args.ibot_loss_weight!r} is not valid with {unmaskable}: iBOT replaces masked "
            f"patches by the backbone's mask token, which it has not; use {MASKED_PATCH_MODELS}"
        )


def _unmaskable_backbone(args: DinoTrainingArguments) -> str | None:
    """What the run's backbone is when it is known to have no mask token (a timm model, a CNN or Swin of
    transformers), else None."""
    spec = model_spec(args)
    if spec.startswith(TIMM_PREFIX):
        return f"the timm model {spec}"
    config_file = Path(spec) / "config.json"
    if not (os.path.isdir(spec) and config_file.is_file()):
        return None
    config = json.loads(config_file.read_text())
    if "architecture" in config:
        return f"the timm model in {spec}"
    model_type = config.get("model_type")
    if model_type not in (*MASKABLE, DinoConfig.model_type):
        return f"the {model_type} model in {spec}"
    return None


# The distillation options and their defaults: set without --distill_from, they would do nothing.
_DISTILL_DEFAULTS = {
    "distill_global_weight": 1.0,
    "distill_local_weight": 1.0,
    "distill_local_loss": "similarity",
    "distill_projector": "linear",
    "distill_queue_size": None,
    "distill_mixup": False,
    "distill_teacher_size": None,
    "distill_ema_student": False,
}


def lora_on(args: DinoTrainingArguments) -> bool:
    """Whether the backbone trains through LoRA factors (`--lora_rank`)."""
    return args.lora_rank > 0


def _validate_lora(args: DinoTrainingArguments) -> None:
    """LoRA's options: set only with `--lora_rank`, and not beside what would hold a second copy of the frozen
    weights or freeze them otherwise (the family of the backbone is checked once it is built)."""
    if args.lora_rank < 0:
        _fail("lora_rank", args.lora_rank, "a rank >= 1 (ExPLoRA: 64), or 0 to train the whole backbone")
    if not lora_on(args):
        unset = {"lora_alpha": None, "lora_dropout": 0.0, "lora_target_modules": None, "unfreeze_last_blocks": 0}
        unset["push_adapter"] = False
        for name, default in unset.items():
            if getattr(args, name) != default:
                _fail(name, getattr(args, name), "leave it unset, or turn LoRA on with --lora_rank R")
        return
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        _fail("lora_alpha", args.lora_alpha, "a value > 0, or unset (alpha = rank)")
    if not 0 <= args.lora_dropout < 1:
        _fail("lora_dropout", args.lora_dropout, "a probability in [0, 1)")
    if args.unfreeze_last_blocks < 0:
        _fail("unfreeze_last_blocks", args.unfreeze_last_blocks, "a number of blocks >= 0")
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
            _fail(name, getattr(args, name), fix)
    if args.push_adapter and not args.push_to_hub:
        _fail("push_adapter", True, "set with --push_to_hub (the adapter goes beside the merged export)")


def distilling(args: DinoTrainingArguments) -> bool:
    """Whether the run distils a frozen model (`--distill_from`)."""
    return args.distill_from is not None


def dino_on(args: DinoTrainingArguments) -> bool:
    """Whether the run trains with the DINO loss (and so its head, teacher forward and center)."""
    return args.dino_loss_weight > 0


def _validate_distillation(args: DinoTrainingArguments) -> None:
    if args.dino_loss_weight < 0:
        _fail("dino_loss_weight", args.dino_loss_weight, "a weight >= 0")
    if not distilling(args):
        changed = [name for name, default in _DISTILL_DEFAULTS.items() if getattr(args, name) != default]
        if changed:
            _fail(
                changed[0],
                getattr(args, changed[0]),
                "leave it unset, or name the model to distil with --distill_from",
            )
        if not dino_on(args):
            _fail("dino_loss_weight", 0, "a weight > 0: with no --distill_from the DINO loss is the objective")
        return
    for name in ("distill_global_weight", "distill_local_weight"):
        if getattr(args, name) < 0:
            _fail(name, getattr(args, name), "a weight >= 0")
    if not (args.distill_global_weight or args.distill_local_weight or dino_on(args)):
        _fail("distill_global_weight", 0, "a weight > 0 for at least one term of the objective")
    if args.distill_queue_size is not None and args.distill_queue_size < 1:
        _fail("distill_queue_size", args.distill_queue_size, "a number of features >= 1, or unset (by dataset size)")
    if args.distill_teacher_size is not None and args.distill_teacher_size < 1:
        _fail("distill_teacher_size", args.distill_teacher_size, "a side in pixels, e.g. 224, or unset")
    _check_distill_source(args.distill_from)
    if dino_on(args):
        if args.distill_mixup:
            _fail("distill_mixup", True, "mixup mixes the distillation view alone: use it with --dino_loss_weight 0")
        return
    without_dino = {
        "local_crops_number": "the local crops feed the DINO loss alone; set --local_crops_number 0",
        "ibot_loss_weight": "iBOT needs the DINO teacher; set --dino_loss_weight > 0 or --ibot_loss_weight 0",
        "koleo_weight": "KoLeo regularises the DINO run's features; set --dino_loss_weight > 0 or --koleo_weight 0",
        "gram_loss_weight": "Gram anchoring is part of a DINO run; set --dino_loss_weight > 0 or --gram_loss_weight 0",
        "anchor_cosine_weight": "the anchor is part of a DINO run; set --dino_loss_weight > 0 or 0 here",
    }
    for name, fix in without_dino.items():
        if getattr(args, name):
            _fail(name, getattr(args, name), f"0 with --dino_loss_weight 0 ({fix})")
    if args.augment_on == "gpu":
        _fail("augment_on", "gpu", "cpu with --dino_loss_weight 0: the one-view distillation crops are made per image")


def _check_distill_source(spec: str) -> None:
    """`--distill_from` names a model as `--model_name_or_path` would (a vision model is checked once built)."""
    if spec.startswith(TIMM_PREFIX):
        _check_timm_name("distill_from", spec)
    elif os.path.isdir(spec):
        config_file = Path(spec) / "config.json"
        if not config_file.is_file():
            _fail("distill_from", spec, f"{accepted_models_text()} (this folder has no config.json)")
        config = json.loads(config_file.read_text())
        if "architecture" not in config:
            try:
                check_vision_config(config, spec)
            except ValueError as error:
                raise ValueError(f"--distill_from: {error}") from None
    elif os.path.isfile(spec):
        if not spec.endswith((".pth", ".pt", ".safetensors")):
            _fail("distill_from", spec, "a reference DINO checkpoint file ending in .pth, .pt or .safetensors")
    elif spec not in PRESETS and not is_hub_id(spec):
        _fail("distill_from", spec, "an existing model folder or checkpoint file, timm:NAME, or a Hub id org/name")


# The backbone trained when neither --model_name_or_path nor --backbone is given.
DEFAULT_MODEL = "vit_small_patch16"


def model_spec(args: DinoTrainingArguments) -> str:
    """The backbone the run trains: `--backbone`, else `--model_name_or_path`, else `DEFAULT_MODEL`."""
    return args.backbone or args.model_name_or_path or DEFAULT_MODEL


# DinoConfig fields that have training arguments of their own.
_OWN_ARGUMENT = {"drop_path_rate": "--drop_path_rate", "image_size": "--global_crops_size"}


def preset_overrides(args: DinoTrainingArguments) -> dict:
    """`--config_overrides` as typed DinoConfig fields, checked against the preset they change.

    The text is parsed by `PretrainedConfig.update_from_string` (transformers' `--config_overrides`):
    each key must be a field of the config and each value is read as that field's type.

    Raises:
        ValueError: overrides without a preset, an unknown field, a value of the wrong type, a field
            that has its own training argument, or a config the ViT cannot be built with.
    """
    if not args.config_overrides:
        return {}
    spec = model_spec(args)
    if spec not in PRESETS:
        _fail(
            "config_overrides",
            args.config_overrides,
            f"it changes a DinoModel preset trained from scratch ({', '.join(PRESETS)}) given as "
            f"--model_name_or_path; got --model_name_or_path={spec!r} --backbone={args.backbone!r}",
        )
    config = DinoConfig.from_preset(spec)
    try:
        items = dict(item.split("=", 1) for item in args.config_overrides.split(","))
        items = {key.strip(): value.strip() for key, value in items.items()}
        keys = list(items)
        # A field whose preset value is None (layerscale_value) has no type to read the text as: a number.
        unset = {key: float(value) for key, value in items.items() if getattr(config, key, 0) is None}
        typed = ",".join(f"{key}={value}" for key, value in items.items() if key not in unset)
        if typed:
            config.update_from_string(typed)
        for key, value in unset.items():
            setattr(config, key, value)
    except (ValueError, TypeError) as error:
        _fail("config_overrides", args.config_overrides, f"comma-separated key=value fields of DinoConfig ({error})")
    for key in keys:
        if key in _OWN_ARGUMENT:
            _fail("config_overrides", args.config_overrides, f"set {key} with {_OWN_ARGUMENT[key]} instead")
    if config.hidden_size % config.num_attention_heads:
        _fail(
            "config_overrides",
            args.config_overrides,
            f"hidden_size {config.hidden_size} must be a multiple of num_attention_heads {config.num_attention_heads}",
        )
    overrides = {key: getattr(config, key) for key in keys}
    try:
        DinoConfig.from_preset(spec, **overrides)  # the config's own checks of each value
    except ValueError as error:
        _fail("config_overrides", args.config_overrides, str(error))
    return overrides


def _validate_model(args: DinoTrainingArguments) -> None:
    overrides = preset_overrides(args)
    if args.model_name_or_path and args.backbone:
        _fail("backbone", args.backbone, "leave it unset when --model_name_or_path is given (they are alternatives)")
    if args.backbone is not None:
        if not args.backbone.startswith(TIMM_PREFIX):
            _fail(
                "backbone",
                args.backbone,
                "a timm model as timm:NAME, e.g. timm:resnet50; DinoModels go in --model_name_or_path",
            )
        _check_timm_name("backbone", args.backbone)
        return
    spec = model_spec(args)
    if spec.startswith(TIMM_PREFIX):
        _check_timm_name("model_name_or_path", spec)
    elif spec in PRESETS:
        check_crop_sizes(args, DinoConfig.from_preset(spec, **overrides).patch_size)
    elif os.path.isdir(spec):
        config_file = Path(spec) / "config.json"
        _refuse_checkpoint_parts(spec)
        if not config_file.is_file():
            _fail("model_name_or_path", spec, f"{accepted_models_text()} (this folder has no config.json)")
        config = json.loads(config_file.read_text())
        if "architecture" not in config:  # a transformers folder; timm folders are checked once built
            try:
                model_type = check_vision_config(config, spec)
            except ValueError as error:
                raise ValueError(f"--model_name_or_path: {error}") from None
            if model_type == DinoConfig.model_type or FAMILIES[model_type].fixed_patch_grid:
                check_crop_sizes(args, config.get("patch_size"))
    elif os.path.isfile(spec):
        _refuse_checkpoint_parts(spec)
        if not spec.endswith((".pth", ".pt", ".safetensors")):
            _fail("model_name_or_path", spec, "a reference DINO checkpoint file ending in .pth, .pt or .safetensors")
    elif not is_hub_id(spec):
        _fail(
            "model_name_or_path",
            spec,
            f"a DinoModel preset ({', '.join(PRESETS)}), an existing folder or checkpoint file, or a Hub id org/name",
        )


def _refuse_checkpoint_parts(spec: str) -> None:
    """A training checkpoint, or a file of one, is no model to start from: --init_from_checkpoint takes it."""
    path = Path(spec)
    if is_checkpoint(path):
        holder, what = path, "a training checkpoint"
    elif path.is_file() and (holder := checkpoint_holding(path)) is not None:
        what = f"the file {path.name} of the training checkpoint {holder}"
    else:
        return
    _fail(
        "model_name_or_path",
        spec,
        f"a model, and this is {what}: start from all of it (student, teacher, heads, center) with "
        f"--init_from_checkpoint {holder}, or from its teacher backbone alone with --model_name_or_path "
        f"{holder / 'teacher_backbone'}",
    )


def _check_timm_name(field_name: str, spec: str) -> None:
    """`spec` is timm:NAME with a NAME that timm knows (or a hf-hub: / local-dir: reference)."""
    name = spec.removeprefix(TIMM_PREFIX)
    if not is_external_timm_name(name) and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (closest: {', '.join(TIMM_PREFIX + match for match in close)})" if close else ""
        _fail(field_name, spec, f"a model name that timm knows, see timm.list_models(){hint}")


def _validate_data(args: DinoTrainingArguments) -> None:
    sources = [name for name in DATA_SOURCE_FIELDS if getattr(args, name)]
    if args.demo and sources:
        _fail("demo", True, f"train on the demo dataset or on --{sources[0]}, not both")
    if not args.demo and not sources:
        raise ValueError(
            "no training data: pass --dataset_name (a Hub id), --train_dir (a folder of images) or --data_files "
            "(parquet / webdataset shards), or --demo to train on the generated demo dataset"
        )
    if len(sources) > 1:
        _fail(sources[1], getattr(args, sources[1]), f"leave it unset when --{sources[0]} is given (one source)")
    if args.train_dir and not os.path.isdir(args.train_dir):
        _fail("train_dir", args.train_dir, "an existing folder of images")
    for pattern in args.data_files or []:
        if "://" not in pattern and not glob.glob(pattern, recursive=True):
            _fail("data_files", pattern, "paths or globs that match existing files (or hf:// URLs)")
    if args.eval_train_dir:
        for split in (args.eval_train_split, args.eval_split):
            if not os.path.isdir(os.path.join(args.eval_train_dir, split)):
                _fail(
                    "eval_train_dir",
                    args.eval_train_dir,
                    f"a folder holding the sub-folders {args.eval_train_split}/ and {args.eval_split}/ "
                    "of labelled images",
                )
    if args.eval_steps is not None and not (args.eval_dataset_name or args.eval_train_dir or args.demo):
        _fail("eval_steps", args.eval_steps, "set it together with --eval_dataset_name or --eval_train_dir")
    if args.stop_if_knn_drops is not None and (args.stop_if_knn_drops <= 0 or args.eval_steps is None):
        _fail(
            "stop_if_knn_drops",
            args.stop_if_knn_drops,
            "points of k-NN top-1 accuracy > 0, set together with --eval_steps N and an evaluation set "
            "(--eval_train_dir or --eval_dataset_name)",
        )
    if args.dataset_name:
        _refuse_saved_dataset(args.dataset_name, args.train_split)


def _refuse_saved_dataset(name: str, split: str) -> None:
    """A folder of `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`) does not stream; its arrow files do."""
    if os.path.isfile(os.path.join(name, "state.json")):
        files = os.path.join(name, "*.arrow")
    elif os.path.isfile(os.path.join(name, "dataset_dict.json")):
        files = os.path.join(name, split, "*.arrow")
    else:
        return
    _fail(
        "dataset_name",
        name,
        f"a Hub dataset id or a folder of data files; this folder was written by save_to_disk: pass its arrow "
        f"files as --data_files '{files}'",
    )


def refuse_settings_without_effect(args: DinoTrainingArguments, given: set[str]) -> None:
    """Refuse a setting named on the command line (`given`: the field names there) that the other settings
    leave without effect; the same setting from a config file is named in the plan line instead
    (`TrainingPlan.notes`).

    Raises:
        ValueError: `--warmup_teacher_temp` different from `--teacher_temp` without a temperature warm-up,
            `--warmup_teacher_temp_epochs` with nothing to warm up, `--head_warmup_steps` with
            `--init_from_checkpoint` (whose head is trained already).
    """
    no_temperature_warmup = args.warmup_teacher_temp_epochs == 0
    if "warmup_teacher_temp" in given and no_temperature_warmup and args.warmup_teacher_temp != args.teacher_temp:
        _fail(
            "warmup_teacher_temp",
            args.warmup_teacher_temp,
            f"a starting temperature needs a warm-up: --warmup_teacher_temp_epochs is 0, so the teacher "
            f"temperature is --teacher_temp {args.teacher_temp} from the first step; set "
            "--warmup_teacher_temp_epochs (e.g. 30, the paper's) or leave --warmup_teacher_temp out",
        )
    if "warmup_teacher_temp_epochs" in given and not no_temperature_warmup:
        if args.warmup_teacher_temp == args.teacher_temp:
            _fail(
                "warmup_teacher_temp_epochs",
                args.warmup_teacher_temp_epochs,
                f"a warm-up from --warmup_teacher_temp to --teacher_temp, and both are {args.teacher_temp}; set "
                "--warmup_teacher_temp to the starting temperature (e.g. 0.04, the paper's) or leave "
                "--warmup_teacher_temp_epochs out",
            )
    if "head_warmup_steps" in given and args.head_warmup_steps and args.init_from_checkpoint:
        _fail(
            "head_warmup_steps",
            args.head_warmup_steps,
            "a warm-up of a fresh head, and --init_from_checkpoint brings the checkpoint's trained head; leave "
            "--head_warmup_steps out (or 0)",
        )


def _given_fields(argv: list[str]) -> set[str]:
    """The field names of the flags in `argv` (`--no_norm_last_layer` names norm_last_layer)."""
    names = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return names | {name.removeprefix("no_") for name in names}


class _TrainingArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are `ValueError`s, so that scripts/pretrain.py says them on the first
    line of its output (argparse prints its usage, dozens of lines here, first)."""

    def error(self, message: str):
        raise ValueError(f"{message}; see `scripts/pretrain.py --help`")


def parse_training_args(argv: list[str] | None = None) -> DinoTrainingArguments:
    """Parse `argv` as the Hugging Face example scripts do; `--config FILE.yaml` sets the defaults.

    Unknown keys in the YAML file are an error that lists them. A config's `demo: true` gives way to
    a data source (`--dataset_name`, `--train_dir`, `--data_files`) named on the command line or in the
    same file, so `--config configs/demo.yaml --train_dir ~/images` runs the demo recipe on those
    images; `--demo` given on the command line together with a data source is an error. A config's
    `eval_steps` and `stop_if_knn_drops` (the k-NN guard) are dropped when no evaluation set is named.
    """
    # Abbreviations off: argparse would take `--num_train_epoch 3` as --num_train_epochs, `--conf` as --config.
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = _TrainingArgumentParser(DinoTrainingArguments, allow_abbrev=False)
    parser.add_argument("--config", default=None, help="YAML file of defaults; command-line flags override it.")
    if known.config:
        defaults = yaml.safe_load(Path(known.config).read_text()) or {}
        names = {f.name for f in dataclasses.fields(DinoTrainingArguments)}
        unknown = sorted(set(defaults) - names)
        if unknown:
            raise ValueError(
                f"{known.config}: unknown field(s) {', '.join(unknown)}; see `scripts/pretrain.py --help`"
            )
        parser.set_defaults(**defaults)
    namespace, unknown = parser.parse_known_args(rest)
    if unknown:
        raise ValueError(unknown_flags_message(parser, unknown))
    values = {name: getattr(namespace, name) for name in (f.name for f in dataclasses.fields(DinoTrainingArguments))}
    demo_on_command_line = any(arg == "--demo" or arg.startswith("--demo=") for arg in rest)
    if values["demo"] and not demo_on_command_line and any(values[name] for name in DATA_SOURCE_FIELDS):
        values["demo"] = False  # a config's demo data gives way to data named on the command line or in the file
    if not (values["eval_dataset_name"] or values["eval_train_dir"] or values["demo"]):
        # A config's k-NN guard gives way when no evaluation set is named (unlabelled domain images); the
        # same flags given on the command line without one are refused by `validate`.
        for name in ("eval_steps", "stop_if_knn_drops"):
            if not any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in rest):
                values[name] = None
    args = DinoTrainingArguments(**values)
    refuse_settings_without_effect(args, _given_fields(rest))
    return args


__all__ = [
    "DinoTrainingArguments",
    "check_crop_sizes",
    "parse_training_args",
    "refuse_settings_without_effect",
    "validate",
]
