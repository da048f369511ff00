"""DINO training (Caron et al. 2021, Algorithm 1) with Accelerate.

`train(args)` reads top to bottom as the accelerate examples do: accelerator -> networks -> data ->
step plan -> optimiser and devices -> resume -> loop -> final save. Each step of the loop is
`dino_hf.training.step.train_step`; checkpoints and exports are `dino_hf.run_files.writer`'s.

The loop reads nothing back from the device between logging steps: the loss, the diagnostics and the
count of steps skipped on a non-finite loss stay tensors until a logging step (or a checkpoint) reads
them, so that on a GPU the host queues step after step.
"""

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file
from torch import nn

from ..augment.batch_multicrop import BatchMultiCrop, DecodeAndCap
from ..augment.multicrop import MultiCropTransform
from ..data.image_values import check_image_column
from ..data.loader import SkipReport, build_multicrop_dataloader
from ..data.masks import BlockMasking
from ..data.sources import load_image_stream
from ..evaluation.features import knn_accuracy
from ..hub.push import HubPusher
from ..models.lora import base_pointers, check_base, load_own_state, setup_of
from ..models.normalization import Normalization, normalization_of
from ..objectives.anchor import SNAPSHOT_STEP, Anchor, AnchorTerm
from ..objectives.dino import DinoLoss
from ..objectives.distillation import Distillation
from ..objectives.ibot import IBotLoss, IBotTerm
from ..objectives.koleo import KoLeoTerm
from ..objectives.multi_distillation import MultiDistillation
from ..objectives.term import Term
from ..run_files import checkpoints
from ..run_files.collectives import on_any_process
from ..run_files.init_checkpoint import init_checkpoint_folder, load_start
from ..run_files.output_folder import removed_if_refused
from ..run_files.state import RunState
from ..run_files.whole_weights import load_whole_optimizer_state_dict, load_whole_state_dict, whole_state_dict
from ..run_files.writer import CheckpointWriter
from .arguments import DinoTrainingArguments, dino_on, distilling, model_spec, several_teachers
from .batches import DeviceBatches, EndlessBatches
from .console import progress_bar
from .guard import observe
from .layer_decay import freeze_blocks_
from .networks import (
    build_frozen_backbones,
    build_student_teacher,
    has_trained_weights,
    lora_base_dtype,
    student_backbone,
)
from .objectives import (
    build_anchor,
    build_distillation,
    build_ibot_loss,
    build_masking,
    distill_targets,
    distillation_line,
    fit_balancing,
    load_distillation,
    zero_shot_teacher,
)
from .optimization import build_optimizer, get_param_groups
from .plan import TrainingPlan, run_mixed_precision
from .preemption import PreemptionSignals
from .run_log import SampleLog, knn_line, log_line
from .run_sources import dataset_size, describe_source, knn_sources, train_source
from .sharding import shard_like
from .speed import apply_speed_options
from .step import NONFINITE_HINTS, train_step

logger = logging.getLogger(__name__)

# Seconds a run stopped by a signal waits for its last Hub upload: schedulers kill soon after.
PREEMPTION_PUSH_TIMEOUT = 20.0
# With several processes, they agree on a received signal (a collective that waits for the device) at
# logging and checkpoint steps and at least this often.
SIGNAL_CHECK_STEPS = 10


@dataclass
class TrainResult:
    """What a run leaves: where the export is, the steps done and the measured figures.

    `stopped_by` names the signal (SIGTERM, SIGUSR1, SIGINT) that stopped the run before its last
    step; the checkpoint of `global_step` was written then, and no final export or evaluation was made.
    `knn_start` is the k-NN of the teacher at step 0, named `start` ("random-init", or "starting" when
    the run started from trained weights); `knn_best` and `knn_best_step` those of the best teacher,
    exported to `best_export_dir`. `knn_stop` says why `--stop_if_knn_drops` ended the run early (with a
    checkpoint and the final export).
    """

    output_dir: Path
    export_dir: Path
    global_step: int
    checkpoint: Path | None = None
    knn: dict = field(default_factory=dict)
    knn_start: dict = field(default_factory=dict)
    start: str = "random-init"
    knn_best: dict = field(default_factory=dict)
    knn_best_step: int | None = None
    best_export_dir: Path | None = None
    knn_stop: str | None = None
    skipped_samples: dict = field(default_factory=dict)
    push_report: str | None = None
    stopped_by: str | None = None
    exported: str = "teacher"  # the network exported and evaluated: "teacher", or a distilled "student"


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss (see the message for the step and the last checkpoint)."""


@dataclass
class Run:
    """Everything the loop works with, built by the phases of `train`."""

    args: DinoTrainingArguments
    accelerator: Accelerator
    plan: TrainingPlan
    student: nn.Module
    teacher: nn.Module
    dino_loss: DinoLoss
    optimizer: torch.optim.Optimizer
    batches: DeviceBatches
    writer: CheckpointWriter
    eval_sources: tuple[dict, dict] | None
    state: RunState = field(default_factory=RunState)
    skip_report: SkipReport = field(default_factory=SkipReport)
    sample_log: SampleLog | None = None
    nonfinite: "NonFiniteTally | None" = None
    knn_step: int | None = None  # the step of the last k-NN measurement
    knn_stop: str | None = None  # why --stop_if_knn_drops ended the run
    anchor: Anchor | None = None
    ibot_loss: IBotLoss | None = None
    distillation: Distillation | MultiDistillation | None = None


def train(args: DinoTrainingArguments) -> TrainResult:
    """Run DINO pretraining as configured by `args`; returns where the result is.

    SIGTERM, SIGUSR1 and SIGINT are caught while it runs (`PreemptionSignals`): the run checkpoints
    at the end of the current step and returns with `stopped_by` set; the previous handlers are
    restored when it returns.

    Raises:
        NonFiniteLossError: more non-finite losses than `skip_nonfinite_steps` allows.
        checkpoints.CheckpointError: a checkpoint could not be written (the previous one is intact)
            or the one named by `resume_from_checkpoint` is damaged.
    """
    # A run refused (ValueError: exit status 2) before its first checkpoint leaves nothing behind.
    with PreemptionSignals() as signals, removed_if_refused(args.output_dir):
        run = prepare_run(args)
        resume(run)
        stopped_by = train_loop(run, signals)
        if stopped_by is not None:
            return _stopped(run, stopped_by)
        return _final_save(run)


def prepare_run(args: DinoTrainingArguments) -> Run:
    """Accelerator, networks, data, step plan, optimiser and devices: a run ready to resume or start."""
    accelerator = Accelerator(
        mixed_precision=run_mixed_precision(args),
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
    )
    set_seed(args.seed)
    # Networks first: a backbone that cannot take the crop sizes fails before any other work.
    student, teacher, fresh_head, dino_loss, ibot_loss, frozen_backbones = _build_networks(args, accelerator)
    anchor = _build_anchor(args, accelerator, student)  # before the first step, and before any wrapping
    accelerator.print(_networks_line(args, student, frozen_backbones))

    normalization = normalization_of(student.backbone)
    batches, samples_per_epoch, eval_sources = _build_data(
        args, accelerator, build_masking(args, student.backbone), normalization
    )
    batchnorm = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in student.backbone.modules())
    plan = TrainingPlan.from_args(args, samples_per_epoch, accelerator.num_processes, fresh_head, batchnorm)
    accelerator.print(
        f"plan: {plan.last_step} of {plan.total_steps} steps of {plan.total_batch} images, "
        f"{plan.iterations_per_epoch} per epoch, peak lr {plan.peak_lr:.3g}"
        + "".join(f"; {note}" for note in plan.notes())
    )

    student, teacher, whole_teacher, optimizer = _place_networks(args, accelerator, student, teacher)
    if dino_loss is not None:
        dino_loss.to(accelerator.device)
    if ibot_loss is not None:
        ibot_loss.to(accelerator.device)
    distillation = None
    if frozen_backbones:
        heads = accelerator.unwrap_model(student).distill_projector
        distillation = build_distillation(args, frozen_backbones, heads, normalization, samples_per_epoch)
        distillation.to(accelerator.device)
        accelerator.print(distillation_line(args, distillation, accelerator.mixed_precision))
    pusher = None
    if args.push_to_hub and accelerator.is_main_process:
        pusher = HubPusher(args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
    writer = CheckpointWriter(
        accelerator,
        args,
        epoch_of=plan.epoch,
        rebuild_start=lambda: student_backbone(args)[0],
        base_model=_base_model(args, distillation),
        student=student,
        teacher=teacher,
        whole_teacher=whole_teacher,
        dino_loss=dino_loss,
        optimizer=optimizer,
        batches=batches,
        pusher=pusher,
        anchor=anchor,
        ibot_loss=ibot_loss,
        distillation=distillation,
        zero_shot_index=_zero_shot_index(args, distillation),
    )
    run = Run(
        args,
        accelerator,
        plan,
        student,
        teacher,
        dino_loss,
        optimizer,
        batches,
        writer,
        eval_sources,
        state=RunState(num_processes=accelerator.num_processes),
        anchor=anchor,
        ibot_loss=ibot_loss,
        distillation=distillation,
    )
    if args.log_sample_ids:
        run.sample_log = SampleLog(args.log_sample_ids, accelerator.process_index)
    if args.report_to != "none":
        accelerator.init_trackers("dino_hf", config=args.to_dict())
    return run


def _base_model(args: DinoTrainingArguments, distillation: Distillation | None) -> str | None:
    """The weights a distilled student started from: `--model_name_or_path` when it names trained weights;
    else (None) the card reads a transformers backbone's own source."""
    return args.model_name_or_path if distillation is not None and has_trained_weights(args) else None


def _zero_shot_index(args: DinoTrainingArguments, distillation) -> int | None:
    """Which frozen model's text tower the zero-shot export takes (`--distill_zero_shot`), else None."""
    if not args.distill_zero_shot:
        return None
    return list(distillation.teachers).index(zero_shot_teacher(list(distillation.teachers)))


def _build_networks(args: DinoTrainingArguments, accelerator: Accelerator) -> tuple:
    """The student, teacher, whether the head is fresh on trained weights, the DINO and iBOT losses, and the
    backbone of the model distilled from (None without distillation)."""
    frozen_backbones = build_frozen_backbones(args) if distilling(args) else []
    targets = distill_targets(args, frozen_backbones) if frozen_backbones else None
    base_dtype = lora_base_dtype(args, accelerator.mixed_precision)
    student, teacher, fresh_head = build_student_teacher(args, targets, base_dtype)
    dino_loss, ibot_loss = _build_losses(args)
    if args.init_from_checkpoint:  # before anything copies the networks (the anchor)
        _start_from_checkpoint(args, accelerator, student, teacher, dino_loss, ibot_loss)
        fresh_head = False
    if fresh_head and not args.head_warmup_steps and accelerator.is_main_process:
        logger.warning(
            "%s has trained weights but no DINO head: the random head's first gradients reach the backbone; "
            "consider --head_warmup_steps (e.g. one epoch of steps) to train the head alone first",
            args.model_name_or_path,
        )
    return student, teacher, fresh_head, dino_loss, ibot_loss, frozen_backbones


def _networks_line(args: DinoTrainingArguments, student: nn.Module, frozen_backbones: list[nn.Module]) -> str:
    """What the run trains, in one line."""
    name = type(student.backbone.model).__name__
    lora = setup_of(student)
    if lora is not None:
        held = f" (held in {str(lora.base_dtype).removeprefix('torch.')})" if lora.base_dtype is not None else ""
        return (
            f"networks: {name} student and teacher sharing the frozen {lora.base}{held}, head of "
            f"{args.out_dim} prototypes; {lora.describe(student.backbone.model)}"
        )
    if not frozen_backbones:
        return f"networks: {name} student and teacher, head of {args.out_dim} prototypes"
    frozen = " and ".join(
        f"{type(backbone.model).__name__} ({spec}, {backbone.num_features} wide)"
        for spec, backbone in zip(args.distill_from, frozen_backbones)
    )
    dino = f", DINO head of {args.out_dim} prototypes (weight {args.dino_loss_weight:g})" if dino_on(args) else ""
    heads = "heads per frozen model" if several_teachers(args) else "projectors"
    return f"networks: {name} student distilled from the frozen {frozen}, {args.distill_projector} {heads}{dino}"


def _build_losses(args: DinoTrainingArguments) -> tuple[DinoLoss | None, "IBotLoss | None"]:
    """The DINO loss (with its center; None without it, `--dino_loss_weight 0`) and iBOT's masked-patch loss (None
    unless --ibot_loss_weight)."""
    if not dino_on(args):
        return None, build_ibot_loss(args)
    dino_loss = DinoLoss(
        args.out_dim,
        2 + args.local_crops_number,
        args.student_temp,
        args.center_momentum,
        centering=args.centering,
        sinkhorn_iterations=args.sinkhorn_iterations,
    )
    return dino_loss, build_ibot_loss(args)


def _start_from_checkpoint(
    args: DinoTrainingArguments,
    accelerator: Accelerator,
    student: nn.Module,
    teacher: nn.Module,
    dino_loss: DinoLoss,
    ibot_loss: IBotLoss | None = None,
) -> None:
    """`--init_from_checkpoint`: the checkpoint's student, teacher and center in the built networks (and
    its patch center, when both runs have iBOT on)."""
    folder = init_checkpoint_folder(args.init_from_checkpoint, args.output_dir)
    load_start(folder, student, teacher, dino_loss)
    if ibot_loss is not None and (folder / checkpoints.IBOT_FILE).is_file():
        ibot_loss.load_state_dict(load_file(folder / checkpoints.IBOT_FILE))
    newest = "" if folder == Path(args.init_from_checkpoint) else f" (the newest of {args.init_from_checkpoint})"
    accelerator.print(
        f"starting from {folder}{newest}: its student, teacher, heads and center; step 0, a fresh optimiser"
    )


def _build_anchor(args: DinoTrainingArguments, accelerator: Accelerator, student: nn.Module) -> Anchor | None:
    """The frozen copy of the student's backbone that `--gram_loss_weight` and `--anchor_cosine_weight`
    anchor to, on the device (None when both are 0); with `--gram_teacher ema` it holds the place of the
    EMA teacher's first snapshot (`_anchor_at`)."""
    anchor = build_anchor(args, student.backbone)
    if anchor is None:
        return None
    random_start = not (has_trained_weights(args) or args.init_from_checkpoint)
    if random_start and args.gram_teacher == "start" and accelerator.is_main_process:
        logger.warning(
            "anchoring is on (--gram_loss_weight %g, --anchor_cosine_weight %g) but %s starts from random "
            "weights: the student is anchored to its random init; anchoring is meant for continued "
            "pretraining from trained weights (--model_name_or_path)",
            args.gram_loss_weight,
            args.anchor_cosine_weight,
            model_spec(args),
        )
    return anchor.to(accelerator.device)


def multicrop_options(args: DinoTrainingArguments) -> dict:
    """The keyword arguments of `MultiCropTransform` / `BatchMultiCrop` that the run's arguments set."""
    return dict(
        global_crops_size=args.global_crops_size,
        local_crops_size=args.local_crops_size,
        global_crops_scale=tuple(args.global_crops_scale),
        local_crops_scale=tuple(args.local_crops_scale),
        local_crops_number=args.local_crops_number,
        jitter_p=args.color_jitter_p,
        brightness=args.color_jitter[0],
        contrast=args.color_jitter[1],
        saturation=args.color_jitter[2],
        hue=args.color_jitter[3],
        grayscale_p=args.grayscale_p,
        blur_sigma=tuple(args.blur_sigma),
        blur_p=tuple(args.blur_p),
        solarize_p=args.solarize_p,
    )


def _build_data(
    args: DinoTrainingArguments,
    accelerator: Accelerator,
    masks: BlockMasking | None = None,
    normalization: Normalization | None = None,
) -> tuple[DeviceBatches, int | None, tuple | None]:
    """The run's batches on the device, the images per epoch where known, and the k-NN's sources.
    `masks`: iBOT's masking; the workers then draw each batch's masks (`batch["masks"]`). `normalization`:
    the student's (`dino_hf.models.normalization`), ImageNet's when not given. Without the DINO loss, one
    view per image."""
    with accelerator.main_process_first():
        source = train_source(args)
        eval_sources = knn_sources(args)
    accelerator.print(f"training data: {describe_source(source, args.demo)}")
    stream, image_column = load_image_stream(
        **source,
        image_column_name=args.image_column_name,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=args.seed,
    )
    check_image_column(
        stream, image_column, named_by_user=bool(args.image_column_name), source=describe_source(source, args.demo)
    )
    crop_options = multicrop_options(args)
    # With --augment_on gpu the workers decode and cap the size; the crops are made on the accelerator.
    on_device = args.augment_on == "gpu"
    if normalization is not None:
        crop_options.update(mean=normalization.mean, std=normalization.std)
    if on_device:
        transform = DecodeAndCap(args.augment_cap_size)
    else:
        transform = MultiCropTransform(**crop_options, global_crops_number=2 if dino_on(args) else 1)
    loader = build_multicrop_dataloader(
        stream,
        image_column,
        transform,
        batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps,
        num_workers=args.dataloader_num_workers,
        seed=args.seed + accelerator.process_index,
        shuffle_buffer_size=args.shuffle_buffer_size,
        pin_memory=accelerator.device.type == "cuda",
        **({"max_pixels": args.max_image_pixels} if args.max_image_pixels else {}),
        masks=masks,
    )
    # Each pass over the loader draws a worker seed from the generator; a private one keeps the global
    # RNG (stochastic depth) independent of how many passes were started, so a resumed run matches.
    # The samples' augmentations are seeded by their position, not by this generator.
    loader.generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    multicrop = BatchMultiCrop(**crop_options).to(accelerator.device) if on_device else None
    batches = DeviceBatches(
        EndlessBatches(loader),
        accelerator.device,
        multicrop=multicrop,
        seed=args.seed,
        process_index=accelerator.process_index,
    )
    return batches, args.samples_per_epoch or dataset_size(stream, source), eval_sources


def _place_networks(args: DinoTrainingArguments, accelerator: Accelerator, student: nn.Module, teacher: nn.Module):
    """Speed options, the optimiser, and the networks on their devices: DDP or FSDP for the student
    (Accelerate), the teacher sharded like it under FSDP. Returns the student, the teacher, a whole
    teacher copy for the main process (FSDP) or the teacher itself, and the optimiser."""
    apply_speed_options(student, teacher, torch_compile=args.torch_compile, channels_last=args.channels_last)
    student.to(accelerator.device)
    freeze_blocks_(student, args.freeze_blocks)  # requires_grad off before the optimiser and DDP see them
    groups = get_param_groups(student, layer_decay=args.layer_decay, patch_embed_lr_mult=args.patch_embed_lr_mult)
    optimizer = build_optimizer(args.optimizer, groups, device=accelerator.device)
    if accelerator.distributed_type == DistributedType.FSDP and setup_of(student) is not None:
        raise ValueError(
            "--lora_rank runs under DDP or in one process, not under FSDP: sharding the teacher would copy the "
            "frozen weights it shares with the student; launch without --use_fsdp"
        )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(
            "FSDP version 1 is not supported: the teacher follows the student shard by shard with FSDP2; "
            "launch with --fsdp_version 2 (or fsdp_version: 2 in the Accelerate config)"
        )
    # A distillation run without an EMA network: under FSDP the main process loads the gathered student into a
    # whole copy, made before the student is sharded.
    whole_student = None
    if teacher is None and accelerator.is_fsdp2 and accelerator.is_main_process:
        whole_student = copy.deepcopy(student)
    student, optimizer = accelerator.prepare(student, optimizer)
    if teacher is None:
        return student, None, accelerator.unwrap_model(student) if whole_student is None else whole_student, optimizer
    teacher.to(accelerator.device)
    # Under FSDP the teacher is sharded like the student; the main process keeps a whole copy to load
    # the gathered weights into, for the k-NN evaluation and the export.
    whole_teacher = copy.deepcopy(teacher) if accelerator.is_fsdp2 and accelerator.is_main_process else teacher
    if accelerator.is_fsdp2:
        shard_like(teacher, accelerator.unwrap_model(student), accelerator.state.fsdp_plugin.mixed_precision_policy)
    return student, teacher, whole_teacher, optimizer


def resume(run: Run) -> None:
    """Continue from `--resume_from_checkpoint` (weights, optimiser, center, scaler, run state, data
    position and RNG states), or start: then the k-NN of the teacher at step 0 (random-init, or the
    starting weights) is measured, and that teacher is the first best (`teacher_backbone_best`)."""
    args, accelerator = run.args, run.accelerator
    folder = None
    if args.resume_from_checkpoint:
        folder = checkpoints.find_resume_checkpoint(Path(args.output_dir), args.resume_from_checkpoint)
        if folder is None:
            accelerator.print(f"no checkpoint to resume from in {run.writer.checkpoints_dir}: starting from step 0")
    if folder is not None:
        _load_checkpoint(run, folder)
        accelerator.print(f"resumed from {folder} at step {run.state.global_step}")
    elif run.eval_sources is not None and accelerator.is_main_process:
        start = run.writer.network_at_start()
        run.state.knn_start = _knn(run, start)
        accelerator.print(
            f"k-NN of the {start_name(args)} {run.writer.exported_name} at {_knn_size(args)} px: "
            f"{knn_line(run.state.knn_start)}"
        )
        _judge(run, start, run.state.knn_start, 0)
        for frozen in _frozen_models(run.distillation):  # what the student is judged against
            knn = backbone_knn(frozen.backbone, args, run.eval_sources, accelerator.device)
            accelerator.print(f"k-NN of the frozen {frozen.name} at {_knn_size(args)} px: {knn_line(knn)}")
    if isinstance(run.distillation, MultiDistillation):  # a resumed run's statistics came with its checkpoint
        read = fit_balancing(run.distillation, run.batches, args.distill_balancing_batches, accelerator)
        if read:
            accelerator.print(
                f"distillation: the {args.distill_balancing} balancing of each frozen model's patch features fitted "
                f"on {read} batches"
            )
    run.nonfinite = NonFiniteTally(run.state.nonfinite_skipped, accelerator.device)


def _load_checkpoint(run: Run, folder: Path) -> None:
    accelerator = run.accelerator
    saved = checkpoints.load_checkpoint(folder, accelerator.process_index)
    student = accelerator.unwrap_model(run.student)
    if run.distillation is None and saved["distillation"] is not None:
        metadata = saved["distillation"][1]
        teachers = json.loads(metadata["teachers"]) if "teachers" in metadata else [metadata]
        names = ", ".join(repr(teacher.get("source", teacher.get("distill_from"))) for teacher in teachers)
        raise ValueError(
            f"{folder} was trained distilling {names}, and this run has no "
            "--distill_from; resume with the settings of the run that wrote it (its training_args.json in the "
            "checkpoint, e.g. --config configs/distill.yaml --distill_from ...)"
        )
    if run.distillation is not None:  # first: other frozen models give the student other heads
        load_distillation(run.distillation, saved["distillation"], folder)
    lora = setup_of(student)
    check_base(saved["lora_base"], lora, folder)
    for part, network in (("teacher", run.teacher), ("dino_loss", run.dino_loss)):
        if network is not None and saved[part] is None:
            what = "EMA network" if part == "teacher" else "DINO loss"
            raise ValueError(
                f"{folder} has no {part}.safetensors: its run had no {what}, and this one has; resume with the "
                "settings of the run that wrote it (its training_args.json), or start a new run from it with "
                "--init_from_checkpoint"
            )
    if lora is not None:  # the checkpoint holds what is not the base, which this run has built already
        base = base_pointers(student.backbone)
        load_own_state(student, saved["student"], base, "student")
        load_own_state(run.teacher, saved["teacher"], base, "teacher")
    else:
        load_whole_state_dict(student, saved["student"])
        if run.teacher is not None:
            load_whole_state_dict(run.teacher, saved["teacher"])
    if run.dino_loss is not None:
        run.dino_loss.load_state_dict(saved["dino_loss"])
    if run.ibot_loss is not None:
        _load_ibot_loss(run.ibot_loss, saved["ibot_loss"], folder)
    if run.anchor is not None:
        step = saved["trainer_state"]["global_step"]
        snapshots = run.plan.gram_snapshots
        expected = snapshots.held(step) if snapshots is not None else 0
        _load_anchor(run.anchor, saved["anchor"], folder, step, expected, base if lora is not None else None)
    load_whole_optimizer_state_dict(student, run.optimizer, saved["optimizer"])
    if saved["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    run.state = RunState.from_dict(saved["trainer_state"])
    same_split = run.state.num_processes == accelerator.num_processes
    if not same_split:
        logger.warning(
            "%s was written by %d processes and this run has %d: the data stream is split differently, "
            "so it restarts from its beginning (the weights, optimiser and step are restored)",
            folder,
            run.state.num_processes,
            accelerator.num_processes,
        )
    run.batches.load_state_dict(saved["data"] if same_split else None, run.state.global_step)
    if same_split:
        checkpoints.set_rng_state(saved["rng"])
    run.state.num_processes = accelerator.num_processes
    run.skip_report.counts.update(run.state.skipped_samples)
    run.writer.last = folder


def _load_anchor(
    anchor: Anchor, weights: dict | None, folder: Path, step: int, expected: int | None, base: set[int] | None = None
) -> None:
    """The anchor of the checkpoint's run (the start, or the EMA Gram teacher's last snapshot), so that a
    resumed run anchors to the same weights even if the source has changed since; a checkpoint of a run
    without anchoring has none. `expected`: the step its weights must have been taken at after `step`
    steps by this run's Gram settings (0: the start; None: no EMA snapshot yet). `base`: the storage of a LoRA
    run's frozen base (`lora.base_pointers`), which the anchor shares and the checkpoint leaves out.

    Raises:
        ValueError: the saved Gram teacher was taken at another step than this run's settings say (the
            Gram settings changed), or an EMA snapshot is due before `step` and the checkpoint has none.
    """
    if weights is None:
        if anchor.taken_at() != expected:
            raise ValueError(
                f"{folder} has no {checkpoints.ANCHOR_FILE} (its run had no Gram anchoring), and this run's "
                f"--gram_teacher ema takes its first snapshot at step {expected}, before the resumed step {step}; "
                f"resume with --gram_start_step {step} or later"
            )
        if expected == 0:
            logger.warning(
                "%s has no %s (its run had no anchoring): anchoring to the backbone as built now from the run's "
                "--model_name_or_path / --backbone",
                folder,
                checkpoints.ANCHOR_FILE,
            )
        return
    if SNAPSHOT_STEP not in weights:  # written before the step was saved, when the start was the only anchor
        weights = {**weights, SNAPSHOT_STEP: torch.tensor(0)}
    if base is None:
        anchor.load_state_dict(weights)
    else:
        load_own_state(anchor, weights, base, "anchor")
    saved, wanted = ("none" if at is None else f"step {at}" for at in (anchor.taken_at(), expected))
    if saved != wanted:
        raise ValueError(
            f"{folder / checkpoints.ANCHOR_FILE} holds the Gram teacher taken at {saved}, but this run's Gram "
            f"settings (--gram_teacher, --gram_start_step, --gram_update_steps, --gram_max_updates) give {wanted} "
            f"after {step} steps: resume with the settings of the run that wrote it (its training_args.json), or "
            "start a new run from it with --init_from_checkpoint"
        )


def _load_ibot_loss(ibot_loss: IBotLoss, state: dict | None, folder: Path) -> None:
    """The patch center of the checkpoint's run; a checkpoint of a run without iBOT has none, and the
    center then starts at zero."""
    if state is None:
        logger.warning(
            "%s has no %s (its run had no iBOT loss): the patch center starts at zero", folder, checkpoints.IBOT_FILE
        )
        return
    ibot_loss.load_state_dict(state)


def _anchor_at(run: Run, step: int) -> Anchor | None:
    """The anchor that `step` trains against. With `--gram_teacher ema`, the EMA teacher's backbone is taken
    as the Gram teacher before the steps its schedule names (`GramSnapshots`; every process, a collective
    under FSDP), and there is none before the first snapshot: the Gram loss is off, without its forward."""
    snapshots = run.plan.gram_snapshots
    if run.anchor is None or snapshots is None:
        return run.anchor
    if snapshots.due(step):
        run.anchor.snapshot_(run.teacher.backbone, step)
        run.accelerator.print(f"step {step}: Gram teacher taken from the EMA teacher")
    return run.anchor if step >= snapshots.start else None


def _terms_at(run: Run, step: int, weights: dict[str, float], batch: dict) -> list[Term]:
    """The terms added to the DINO loss at `step`, in the order they are added: iBOT (with the batch's
    masks), KoLeo, the anchor's terms (none before an EMA Gram teacher's first snapshot), distillation."""
    terms = []
    if run.ibot_loss is not None:
        terms.append(IBotTerm(run.ibot_loss, weights["ibot"], batch["masks"]))
    if weights["koleo"]:
        terms.append(KoLeoTerm(weights["koleo"]))
    anchor = _anchor_at(run, step)
    if anchor is not None:
        terms.append(AnchorTerm(anchor, weights["gram"], weights["anchor_cos"]))
    if run.distillation is not None:
        terms.append(run.distillation)
    return terms


def train_loop(run: Run, signals: PreemptionSignals) -> str | None:
    """Steps until the plan's last step; returns the signal that stopped the run early, if one did."""
    args, accelerator, plan, state = run.args, run.accelerator, run.plan, run.state
    run.student.train()
    if run.teacher is not None:
        run.teacher.train()
    progress = progress_bar(
        total=plan.last_step,
        initial=state.global_step,
        disable=not accelerator.is_local_main_process,
        desc="distillation" if run.distillation is not None else "DINO",
        dynamic_ncols=True,
    )
    window = LogWindow()
    while state.global_step < plan.last_step:
        step = state.global_step
        crops, batch = next(run.batches)
        run.skip_report.update(batch["skipped"])
        state.stream_retries += batch.get("stream_retries", 0)
        if run.sample_log is not None:
            run.sample_log.write(step, batch["ids"])
        values, weights = plan.step_values(step), plan.term_weights(step)
        metrics = train_step(
            run.student,
            run.teacher,
            run.dino_loss,
            run.optimizer,
            crops,
            values,
            accelerator=accelerator,
            accumulation_steps=args.gradient_accumulation_steps,
            terms=_terms_at(run, step, weights, batch),
        )
        run.nonfinite.add(step, metrics)
        state.global_step = step = step + 1
        progress.update(1)
        window.add(plan.total_batch)
        last = step == plan.last_step
        checkpoint_due = not last and step % plan.checkpoint_every == 0
        if step % args.logging_steps == 0 or last:
            logged = {
                **plan.logged_schedule(step - 1),
                **({"gram_weight": weights["gram"]} if args.gram_loss_weight else {}),
            }
            _log(run, step, metrics, logged, window, progress)
        elif checkpoint_due:
            _check_nonfinite(run)
        if args.eval_steps and step % args.eval_steps == 0 and run.eval_sources is not None:
            if _evaluate(run, step):
                break  # --stop_if_knn_drops: the final save checkpoints and exports this step
        if last:
            break
        if checkpoint_due:
            run.writer.save(step, _synced(run))
        if _signal_received(run, signals, step, checkpoint_due):
            if not checkpoint_due:
                run.writer.save(step, _synced(run))
            progress.close()
            return signals.received or "a signal received by another process"
    progress.close()
    return None


class NonFiniteTally:
    """Steps skipped on a non-finite loss, counted on the device: the count, the last such step and
    its loss, read only when the run logs or checkpoints."""

    def __init__(self, already: int, device: torch.device):
        self.count = torch.tensor(float(already), device=device)
        self.last_step = torch.tensor(-1.0, device=device)
        self.last_loss = torch.tensor(0.0, device=device)
        self.reported = already
        self.what = "DINO loss"  # the loss it keeps: DINO's, or the total when terms are added to it

    def add(self, step: int, metrics: dict) -> None:
        skipped = metrics["nonfinite"] > 0
        self.count += metrics["nonfinite"]
        self.last_step = torch.where(skipped, float(step), self.last_step)
        if "total_loss" in metrics:
            self.what = "loss (DINO and the terms added to it)"
        self.last_loss = torch.where(skipped, metrics.get("total_loss", metrics["loss"]), self.last_loss)

    def read(self) -> tuple[int, int, float]:
        """(skipped steps so far, the last skipped step, its loss)."""
        return int(self.count.item()), int(self.last_step.item()), self.last_loss.item()


def _check_nonfinite(run: Run) -> None:
    """Report steps skipped since the last check; stop the run when more than allowed were."""
    count, step, loss = run.nonfinite.read()
    if count == run.nonfinite.reported:
        return
    run.nonfinite.reported = run.state.nonfinite_skipped = count
    allowed = run.args.skip_nonfinite_steps
    reason = f"{run.nonfinite.what} is {loss}; {NONFINITE_HINTS}"
    if count > allowed:
        raise NonFiniteLossError(
            f"step {step}: {reason}. Last good checkpoint: "
            f"{run.writer.last or 'none (no checkpoint was written yet)'}; "
            "resume with --resume_from_checkpoint latest after changing the setting at fault, or allow a few "
            "such steps with --skip_nonfinite_steps"
        )
    run.accelerator.print(f"step {step} skipped ({count} of {allowed} allowed by --skip_nonfinite_steps): {reason}")


def _synced(run: Run) -> RunState:
    """The run state with its device-side counters read, as a checkpoint saves it."""
    _check_nonfinite(run)
    run.state.skipped_samples = dict(run.skip_report.counts)
    return run.state


class LogWindow:
    """Images and seconds since the last logging step."""

    def __init__(self):
        self.images, self.start = 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    def rate(self) -> float:
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        self.images, self.start = 0, time.perf_counter()
        return rate


def _log(run: Run, step: int, metrics: dict, schedule: dict, window: LogWindow, progress) -> None:
    """A logging step: the one place the loop reads the step's tensors back."""
    _check_nonfinite(run)
    values = {key: value.item() for key, value in metrics.items() if key != "nonfinite"}
    logs = {
        **values,
        **schedule,
        "epoch": run.plan.epoch(step),
        "images_per_second": window.rate(),
        "nonfinite_skipped": run.state.nonfinite_skipped,
        "stream_retries": run.state.stream_retries,
    }
    logs.update({f"skipped_{reason}": count for reason, count in run.skip_report.counts.items()})
    progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{schedule['lr']:.2e}")
    run.accelerator.log(logs, step=step)
    run.accelerator.print(log_line(step, logs))


def _signal_received(run: Run, signals: PreemptionSignals, step: int, checkpoint_due: bool) -> bool:
    """Whether the run stops here for a signal; every process answers the same at the same step."""
    accelerator = run.accelerator
    if accelerator.num_processes == 1:
        return signals.received is not None
    if step % run.args.logging_steps and step % SIGNAL_CHECK_STEPS and not checkpoint_due:
        return False
    return on_any_process(accelerator, signals.received is not None)


def _knn_size(args: DinoTrainingArguments) -> int:
    return args.eval_image_size or args.global_crops_size


def backbone_knn(backbone: nn.Module, args: DinoTrainingArguments, sources: tuple[dict, dict], device=None) -> dict:
    """The k-NN metrics of `backbone` on `sources` (memory bank, queries), as a run with `args`
    evaluates its teacher: at the run's k-NN image size, with its image and label columns."""
    return knn_accuracy(
        backbone,
        sources,
        _knn_size(args),
        image_column_name=args.image_column_name,
        label_column_name=args.label_column_name,
        device=device,
    )


def _frozen_models(distillation) -> list:
    """The frozen models a distillation run learns from (none without distillation)."""
    if distillation is None:
        return []
    if isinstance(distillation, MultiDistillation):
        return [teacher.frozen for teacher in distillation.teachers]
    return [distillation.frozen]


def _knn(run: Run, teacher: nn.Module) -> dict:
    return backbone_knn(teacher.backbone, run.args, run.eval_sources, run.accelerator.device)


def _evaluate(run: Run, step: int) -> bool:
    """The k-NN of the teacher at `step` (all processes call it: under FSDP the teacher is gathered); a
    new best is exported. Returns whether `--stop_if_knn_drops` ends the run here (on every process)."""
    teacher = run.writer.exported()
    stop = None
    if run.accelerator.is_main_process:
        run.state.knn = _knn(run, teacher)
        run.knn_step = step
        run.accelerator.log({f"eval/{key}": value for key, value in run.state.knn.items()}, step=step)
        run.accelerator.print(f"step {step} k-NN at {_knn_size(run.args)} px: {knn_line(run.state.knn)}")
        stop = _judge(run, teacher, run.state.knn, step, run.args.stop_if_knn_drops)
    return on_any_process(run.accelerator, stop is not None)  # a collective: the others wait for the k-NN


def start_name(args: DinoTrainingArguments) -> str:
    """The teacher at step 0: "starting" when the run starts from trained weights (a saved model, a Hub
    id, trained timm weights, a reference file, `--init_from_checkpoint`), else "random-init"."""
    return "starting" if args.init_from_checkpoint or has_trained_weights(args) else "random-init"


def _judge(run: Run, teacher: nn.Module, knn: dict, step: int, stop_if_drops: float | None = None) -> str | None:
    """The k-NN figures `knn` of `teacher` at `step` against the best so far (main process): a new best
    is exported to `teacher_backbone_best`; returns why the run stops, if it does."""
    writer = run.writer
    verdict = observe(run.state, knn, step, stop_if_drops)
    if verdict.new_best:
        writer.export_best(teacher, step, run.state)
        run.accelerator.print(
            f"step {step}: the best k-NN so far; {writer.exported_name} exported to {writer.best_export_dir}"
        )
    if verdict.stop is not None:
        run.knn_stop = verdict.stop
        run.accelerator.print(f"step {step}: stopping with a checkpoint and the final export: {verdict.stop}")
    return verdict.stop


def _stopped(run: Run, stopped_by: str) -> TrainResult:
    accelerator, writer, state = run.accelerator, run.writer, run.state
    accelerator.print(
        f"{stopped_by}: stopped after step {state.global_step} of {run.plan.last_step}; checkpoint "
        f"{writer.last}; continue with --resume_from_checkpoint latest"
    )
    result = TrainResult(
        writer.output_dir,
        writer.export_dir,
        state.global_step,
        checkpoint=writer.last,
        skipped_samples=dict(run.skip_report.counts),
        stopped_by=stopped_by,
    )
    if writer.pusher is not None:
        result.push_report = str(writer.pusher.finish(timeout=PREEMPTION_PUSH_TIMEOUT))
    accelerator.end_training()
    return result


def _final_save(run: Run) -> TrainResult:
    """The trained teacher's k-NN, the last checkpoint, the export and the last Hub upload."""
    accelerator, writer, state = run.accelerator, run.writer, run.state
    # The teacher's whole weights, gathered once (under FSDP) for the k-NN, the checkpoint and the export.
    final_state = whole_state_dict(run.teacher) if accelerator.is_fsdp2 and run.teacher is not None else None
    final_teacher = writer.exported({"teacher": final_state} if final_state is not None else None)
    if run.eval_sources is not None and accelerator.is_main_process:
        if run.knn_step != state.global_step:  # not measured at this step already
            state.knn = _knn(run, final_teacher)
            accelerator.log({f"eval/{key}": value for key, value in state.knn.items()}, step=state.global_step)
            _judge(run, final_teacher, state.knn, state.global_step)
        accelerator.print(
            f"k-NN of the trained {writer.exported_name} at {_knn_size(run.args)} px: {knn_line(state.knn)}"
        )
    final = writer.save(state.global_step, _synced(run), final_state, final_teacher)
    result = TrainResult(
        writer.output_dir,
        writer.export_dir,
        state.global_step,
        checkpoint=final,
        knn=state.knn,
        knn_start=state.knn_start,
        start=start_name(run.args),
        knn_best=state.knn_best,
        knn_best_step=state.knn_best_step,
        best_export_dir=writer.best_export_dir if state.knn_best_step is not None else None,
        knn_stop=run.knn_stop,
        skipped_samples=dict(run.skip_report.counts),
        exported=writer.exported_name,
    )
    if accelerator.is_main_process:
        writer.export(final_teacher, writer.export_dir, state.global_step, state)
        accelerator.print(run.skip_report.summary())
        if state.nonfinite_skipped:
            accelerator.print(f"steps skipped on a non-finite loss: {state.nonfinite_skipped}")
        if writer.pusher is not None:
            writer.push(writer.output_dir, f"End of training, step {state.global_step}")
            report = writer.pusher.finish()
            if writer.adapter_pusher is not None:
                accelerator.print(f"Hub upload of the adapter: {writer.adapter_pusher.finish()}")
            result.push_report = str(report)
            accelerator.print(f"Hub upload: {report}")
        accelerator.print(f"checkpoint: {final}\n{writer.exported_name} backbone: {writer.export_dir}")
    accelerator.end_training()
    return result


__all__ = ["NonFiniteLossError", "TrainResult", "backbone_knn", "train"]
