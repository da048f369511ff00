"""DINO training (Caron et al. 2021, Algorithm 1) with Accelerate.

`train` is the whole run, in phases: accelerator -> data -> models -> optimiser and schedules ->
resume -> loop (with checkpoints, k-NN and Hub pushes) -> final save. Each step of the loop is
`dino_hf.training.step.train_step`.
"""

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm

from ..augment.batch_multicrop import BatchMultiCrop, DecodeAndCap
from ..augment.multicrop import MultiCropTransform
from ..convert.export import export_backbone
from ..data.loader import SkipReport, build_multicrop_dataloader
from ..data.sources import load_image_stream
from ..evaluation.features import knn_accuracy
from ..hub.model_card import EvalFigure, render_model_card
from ..hub.push import HubPusher
from . import checkpoints as checkpointing
from .arguments import DinoTrainingArguments
from .batches import EndlessBatches
from .collectives import on_any_process, on_every_process
from .loss import DinoLoss
from .networks import build_student_teacher
from .optimization import build_optimizer, get_param_groups
from .preemption import PreemptionSignals
from .run_sources import dataset_size, describe_source, knn_sources, train_source
from .schedules import (
    learning_rate_at,
    scaled_learning_rate,
    teacher_momentum_at,
    teacher_temperature_at,
    weight_decay_at,
)
from .sharding import (
    load_whole_optimizer_state_dict,
    load_whole_state_dict,
    shard_like,
    whole_optimizer_state_dict,
    whole_state_dict,
)
from .speed import apply_speed_options
from .step import train_step

logger = logging.getLogger(__name__)

# Seconds a run stopped by a signal waits for its last Hub upload: schedulers kill soon after.
PREEMPTION_PUSH_TIMEOUT = 20.0


# ---------------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    """What a run leaves: where the export is, the steps done and the measured figures.

    `stopped_by` names the signal (SIGTERM, SIGUSR1) that stopped the run before its last step; the
    checkpoint of `global_step` was written then, and no final export or evaluation was made.
    """

    output_dir: Path
    export_dir: Path
    global_step: int
    checkpoint: Path | None = None
    knn: dict = field(default_factory=dict)
    knn_random_init: dict = field(default_factory=dict)
    skipped_samples: dict = field(default_factory=dict)
    push_report: str | None = None
    stopped_by: str | None = None


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss (see the message for the step and the last checkpoint)."""


def train(args: DinoTrainingArguments) -> TrainResult:
    """Run DINO pretraining as configured by `args`; returns where the result is.

    SIGTERM and SIGUSR1 are caught while it runs (`PreemptionSignals`): the run
    checkpoints at the end of the current step and returns with `stopped_by` set; the previous
    handlers are restored when it returns.

    Raises:
        NonFiniteLossError: more non-finite losses than `skip_nonfinite_steps` allows.
        checkpointing.CheckpointError: a checkpoint could not be written (the previous one is
            intact) or the one named by `resume_from_checkpoint` is damaged.
    """
    with PreemptionSignals() as signals:
        return _train(args, signals)


def _train(args: DinoTrainingArguments, signals: PreemptionSignals) -> TrainResult:
    # ---- accelerator ------------------------------------------------------------------------
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
    )
    output_dir = Path(args.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    export_dir = output_dir / "teacher_backbone"
    set_seed(args.seed)

    # ---- models (first: a backbone that cannot take the crop sizes fails before any other work)
    student, teacher, fresh_head = build_student_teacher(args)
    head_warmup_steps = args.head_warmup_steps if fresh_head else 0
    if fresh_head and not head_warmup_steps and accelerator.is_main_process:
        logger.warning(
            "%s has trained weights but no DINO head: the random head's first gradients reach the backbone; "
            "consider --head_warmup_steps (e.g. one epoch of steps) to train the head alone first",
            args.model_name_or_path,
        )
    dino_loss = DinoLoss(args.out_dim, 2 + args.local_crops_number, args.student_temp, args.center_momentum)
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)

    # ---- data -------------------------------------------------------------------------------
    with accelerator.main_process_first():
        source = train_source(args)
        eval_sources = knn_sources(args)
    accelerator.print(f"training data: {describe_source(source, args.demo)}")
    stream, image_column = load_image_stream(
        **source, image_column_name=args.image_column_name, rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=args.seed,
    )
    crop_options = dict(
        global_crops_size=args.global_crops_size,
        local_crops_size=args.local_crops_size,
        global_crops_scale=tuple(args.global_crops_scale),
        local_crops_scale=tuple(args.local_crops_scale),
        local_crops_number=args.local_crops_number,
    )
    device_multicrop = None
    if args.augment_on == "gpu":
        # Workers decode and cap the size; the crops are made on the accelerator, in batch.
        transform = DecodeAndCap(args.augment_cap_size)
        device_multicrop = BatchMultiCrop(**crop_options)
        crop_generator = torch.Generator(device=accelerator.device)
    else:
        transform = MultiCropTransform(**crop_options)
    batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
    loader_options = {"max_pixels": args.max_image_pixels} if args.max_image_pixels else {}
    loader = build_multicrop_dataloader(
        stream, image_column, transform, batch_size=batch_size, num_workers=args.dataloader_num_workers,
        seed=args.seed + accelerator.process_index, shuffle_buffer_size=args.shuffle_buffer_size, **loader_options,
    )
    # Each pass over the loader draws a worker seed from the generator; a private one keeps the global
    # RNG (stochastic depth) independent of how many passes were started, so a resumed run matches.
    # The samples' augmentations are seeded by their position, not by this generator.
    loader.generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    batches = EndlessBatches(loader)
    total_batch = batch_size * accelerator.num_processes
    samples_per_epoch = args.samples_per_epoch or dataset_size(stream, source)
    if samples_per_epoch is None:
        raise ValueError(
            "the length of this stream is unknown: pass --samples_per_epoch (images per epoch) so that the "
            "schedules can be laid out"
        )
    iterations_per_epoch = max(1, samples_per_epoch // total_batch)
    total_steps = max(2, round(args.num_train_epochs * iterations_per_epoch))
    last_step = min(total_steps, args.max_train_steps or total_steps)

    # ---- optimiser and schedules ------------------------------------------------------------
    apply_speed_options(student, teacher, torch_compile=args.torch_compile, channels_last=args.channels_last)
    student.to(accelerator.device)
    optimizer = build_optimizer(args.optimizer, get_param_groups(student), device=accelerator.device)
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(
            "FSDP version 1 is not supported: the teacher follows the student shard by shard with FSDP2; "
            "launch with --fsdp_version 2 (or fsdp_version: 2 in the Accelerate config)"
        )
    student, optimizer = accelerator.prepare(student, optimizer)  # DDP or FSDP for the student only
    teacher.to(accelerator.device)
    # Under FSDP the teacher is sharded like the student; the main process keeps a whole copy to load
    # the gathered weights into, for the k-NN evaluation and the export.
    whole_teacher = copy.deepcopy(teacher) if accelerator.is_fsdp2 and accelerator.is_main_process else teacher
    if accelerator.is_fsdp2:
        shard_like(teacher, accelerator.unwrap_model(student), accelerator.state.fsdp_plugin.mixed_precision_policy)
    dino_loss.to(accelerator.device)
    peak_lr = scaled_learning_rate(args.learning_rate, total_batch)
    lr_warmup_steps = min(round(args.warmup_epochs * iterations_per_epoch), total_steps - 1)
    temp_warmup_steps = round(args.warmup_teacher_temp_epochs * iterations_per_epoch)
    freeze_last_layer_steps = round(args.freeze_last_layer * iterations_per_epoch)
    checkpoint_every = iterations_per_epoch if args.checkpoint_every_epoch else int(args.checkpointing_steps)

    # ---- resume -----------------------------------------------------------------------------
    global_step = 0
    state = {"global_step": 0, "nonfinite_skipped": 0, "skipped_samples": {}, "knn_random_init": {}, "knn": {},
             "num_processes": accelerator.num_processes}
    skip_report = SkipReport()
    resume_folder = None
    if args.resume_from_checkpoint:
        resume_folder = checkpointing.find_resume_checkpoint(output_dir, args.resume_from_checkpoint)
        if resume_folder is None:
            accelerator.print(f"no checkpoint to resume from in {checkpoints_dir}: starting from step 0")
    if resume_folder is not None:
        saved = checkpointing.load_checkpoint(resume_folder, accelerator.process_index)
        load_whole_state_dict(accelerator.unwrap_model(student), saved["student"])
        load_whole_state_dict(teacher, saved["teacher"])
        dino_loss.load_state_dict(saved["dino_loss"])
        load_whole_optimizer_state_dict(accelerator.unwrap_model(student), optimizer, saved["optimizer"])
        if saved["scaler"] is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        saved_processes = saved["trainer_state"].get("num_processes", accelerator.num_processes)
        if saved_processes == accelerator.num_processes:
            batches.load_state_dict(saved["data"])
            checkpointing.set_rng_state(saved["rng"])
        else:
            logger.warning(
                "%s was written by %d processes and this run has %d: the data stream is split differently, "
                "so it restarts from its beginning (the weights, optimiser and step are restored)",
                resume_folder, saved_processes, accelerator.num_processes,
            )
        state.update(saved["trainer_state"])
        state["num_processes"] = accelerator.num_processes
        global_step = state["global_step"]
        skip_report.counts.update(state["skipped_samples"])
        accelerator.print(f"resumed from {resume_folder} at step {global_step}")

    pusher = None
    if args.push_to_hub and accelerator.is_main_process:
        pusher = HubPusher(args.hub_model_id, token=args.hub_token, private=args.hub_private_repo)
    if args.report_to != "none":
        accelerator.init_trackers("dino_hf", config=args.to_dict())
    sample_log = _SampleLog(args.log_sample_ids, accelerator.process_index) if args.log_sample_ids else None
    last_checkpoint = resume_folder

    def gathered_teacher(weights: dict | None = None) -> nn.Module:
        """The teacher as one module on the main process (a collective under FSDP, where the
        gathered `weights` are loaded into the whole copy; they are gathered here when not given)."""
        if not accelerator.is_fsdp2:
            return teacher
        weights = whole_state_dict(teacher) if weights is None else weights
        if accelerator.is_main_process:
            whole_teacher.load_state_dict(weights)
        return whole_teacher

    def save(step: int, teacher_state: dict | None = None) -> Path:
        """Checkpoint of `step`: every process writes its part, the main process the shared state and
        the export. `teacher_state`: the teacher's whole weights when they were gathered already.
        Raises `CheckpointError` on every process when any of them could not write."""
        staging = checkpointing.staging_dir(checkpoints_dir, step)
        final = checkpoints_dir / f"checkpoint-{step}"
        # Whole weights for the main process to write: gathered from the shards under FSDP (every process
        # takes part), copied by the main process alone otherwise.
        weights = {}
        if accelerator.is_fsdp2 or accelerator.is_main_process:
            weights = {"student": whole_state_dict(accelerator.unwrap_model(student)),
                       "teacher": whole_state_dict(teacher) if teacher_state is None else teacher_state,
                       "optimizer": whole_optimizer_state_dict(accelerator.unwrap_model(student), optimizer)}
        export_teacher = gathered_teacher(weights.get("teacher"))

        def shared_state() -> None:
            state["global_step"] = step
            state["skipped_samples"] = dict(skip_report.counts)
            card = _model_card(args, export_teacher, step, iterations_per_epoch, state)
            export_backbone(export_teacher.backbone, staging / "teacher_backbone",
                            image_size=args.global_crops_size, model_card=card)
            checkpointing.write_shared_state(
                staging,
                student_state=weights["student"],
                teacher_state=weights["teacher"],
                loss_state=dino_loss.state_dict(),
                optimizer_state=weights["optimizer"],
                scaler_state=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                trainer_state=state,
                training_args=args.to_dict(),
            )
            checkpointing.finalize(staging, checkpoints_dir, step, args.checkpoints_total_limit)

        def fresh_staging() -> None:  # a killed earlier attempt may have left files of its own there
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

        try:
            on_every_process(accelerator, fresh_staging, main_only=True)
            on_every_process(accelerator, lambda: checkpointing.write_process_state(
                staging, accelerator.process_index, batches.state_dict()))
            on_every_process(accelerator, shared_state, main_only=True)
        except checkpointing.WRITE_ERRORS as error:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            raise checkpointing.CheckpointError(
                f"could not write the checkpoint of step {step} to {final}: {str(error).rstrip('. ')}. The previous "
                f"checkpoint {last_checkpoint or '(none: this was the first)'} is intact; "
                f"{checkpointing.write_error_advice(error, checkpoints_dir)}, then resume with "
                "--resume_from_checkpoint latest"
            ) from error
        if pusher is not None:
            pusher.push(final / "teacher_backbone", f"Training step {step}")
        return final

    if eval_sources is not None and global_step == 0 and accelerator.is_main_process:
        state["knn_random_init"] = _knn(whole_teacher, eval_sources, args, accelerator)
        accelerator.print(f"k-NN of the random-init teacher: {_knn_line(state['knn_random_init'])}")

    # ---- loop -------------------------------------------------------------------------------
    student.train()
    teacher.train()
    progress = tqdm(total=last_step, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="DINO", dynamic_ncols=True)
    window_images, window_start = 0, time.perf_counter()
    stopped_by = None
    while global_step < last_step:
        batch = next(batches)
        skip_report.update(batch["skipped"])
        state["stream_retries"] = state.get("stream_retries", 0) + batch.get("stream_retries", 0)
        if sample_log is not None:
            sample_log.write(global_step, batch["ids"])
        crops = [crop.to(accelerator.device, non_blocking=True) for crop in batch["crops"]]
        step = global_step
        if device_multicrop is not None:
            # Seeded by the step (and process), so a resumed run makes the same crops without saved state.
            crop_generator.manual_seed(args.seed * 1_000_003 + accelerator.process_index * 10_007 + step)
            crops = device_multicrop(crops[0], crop_generator)
        schedule = {
            "lr": learning_rate_at(step, total_steps, peak_lr, args.min_lr, lr_warmup_steps),
            "weight_decay": weight_decay_at(step, total_steps, args.weight_decay, args.weight_decay_end),
            "momentum": teacher_momentum_at(step, total_steps, args.momentum_teacher),
            "teacher_temp": teacher_temperature_at(step, temp_warmup_steps, args.warmup_teacher_temp,
                                                   args.teacher_temp),
        }
        try:
            metrics = train_step(
                student, teacher, dino_loss, optimizer, crops, **schedule,
                clip_grad=args.clip_grad,
                freeze_last_layer=step < freeze_last_layer_steps,
                accelerator=accelerator,
                accumulation_steps=args.gradient_accumulation_steps,
                freeze_backbone=step < head_warmup_steps,
            )
        except FloatingPointError as error:
            optimizer.zero_grad(set_to_none=True)
            state["nonfinite_skipped"] += 1
            if state["nonfinite_skipped"] > args.skip_nonfinite_steps:
                raise NonFiniteLossError(
                    f"step {step}: {error}. Last good checkpoint: "
                    f"{last_checkpoint or 'none (no checkpoint was written yet)'}; resume with "
                    "--resume_from_checkpoint latest after changing the setting at fault, or allow a few "
                    "such steps with --skip_nonfinite_steps"
                ) from error
            accelerator.print(f"step {step} skipped ({state['nonfinite_skipped']} of {args.skip_nonfinite_steps} "
                              f"allowed by --skip_nonfinite_steps): {error}")
            continue
        global_step += 1
        progress.update(1)
        window_images += total_batch

        if global_step % args.logging_steps == 0 or global_step == last_step:
            elapsed = time.perf_counter() - window_start
            logs = {**metrics, **schedule, "epoch": global_step / iterations_per_epoch,
                    "images_per_second": window_images / max(elapsed, 1e-9),
                    "nonfinite_skipped": state["nonfinite_skipped"], "stream_retries": state.get("stream_retries", 0)}
            logs.update({f"skipped_{reason}": count for reason, count in skip_report.counts.items()})
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{schedule['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            accelerator.print(_log_line(global_step, logs))
            window_images, window_start = 0, time.perf_counter()

        if args.eval_steps and global_step % args.eval_steps == 0 and eval_sources is not None:
            evaluated = gathered_teacher()
            if accelerator.is_main_process:
                state["knn"] = _knn(evaluated, eval_sources, args, accelerator)
                accelerator.log({f"eval/{k}": v for k, v in state["knn"].items()}, step=global_step)
                accelerator.print(f"step {global_step} k-NN: {_knn_line(state['knn'])}")
            accelerator.wait_for_everyone()
        if global_step == last_step:
            break
        if global_step % checkpoint_every == 0:
            last_checkpoint = save(global_step)
        if on_any_process(accelerator, signals.received is not None):  # all processes stop at the same step
            if global_step % checkpoint_every:
                last_checkpoint = save(global_step)
            stopped_by = signals.received or "a signal received by another process"
            break
    progress.close()

    if stopped_by is not None:
        accelerator.print(f"{stopped_by}: stopped after step {global_step} of {last_step}; checkpoint "
                          f"{last_checkpoint}; continue with --resume_from_checkpoint latest")
        result = TrainResult(output_dir, export_dir, global_step, checkpoint=last_checkpoint,
                             skipped_samples=dict(skip_report.counts), stopped_by=stopped_by)
        if pusher is not None:
            result.push_report = str(pusher.finish(timeout=PREEMPTION_PUSH_TIMEOUT))
        accelerator.end_training()
        return result

    # ---- final save -------------------------------------------------------------------------
    # The teacher's whole weights, gathered once (under FSDP) for the k-NN, the checkpoint and the export.
    final_state = whole_state_dict(teacher) if accelerator.is_fsdp2 else None
    final_teacher = gathered_teacher(final_state)
    if eval_sources is not None and accelerator.is_main_process:
        state["knn"] = _knn(final_teacher, eval_sources, args, accelerator)
        accelerator.log({f"eval/{k}": v for k, v in state["knn"].items()}, step=global_step)
        accelerator.print(f"k-NN of the trained teacher: {_knn_line(state['knn'])}")
    final = save(global_step, final_state)
    result = TrainResult(output_dir, export_dir, global_step, checkpoint=final, knn=state["knn"],
                         knn_random_init=state["knn_random_init"], skipped_samples=dict(skip_report.counts))
    if accelerator.is_main_process:
        export_backbone(final_teacher.backbone, export_dir, image_size=args.global_crops_size,
                        model_card=_model_card(args, final_teacher, global_step, iterations_per_epoch, state))
        accelerator.print(skip_report.summary())
        if state["nonfinite_skipped"]:
            accelerator.print(f"steps skipped on a non-finite loss: {state['nonfinite_skipped']}")
        if pusher is not None:
            pusher.push(export_dir, f"End of training, step {global_step}")
            report = pusher.finish()
            result.push_report = str(report)
            accelerator.print(f"Hub upload: {report}")
        accelerator.print(f"checkpoint: {final}\nteacher backbone: {export_dir}")
    accelerator.end_training()
    return result


class _SampleLog:
    """`--log_sample_ids FILE`: one JSON line per batch, `{"step", "process", "ids"}` (a step retried
    after a non-finite loss appears twice). All processes append to the same file, one write each."""

    def __init__(self, path: str, process: int):
        self.path = path
        self.process = process

    def write(self, step: int, ids: list[str]) -> None:
        line = json.dumps({"step": step, "process": self.process, "ids": list(ids)}) + "\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line.encode())
        finally:
            os.close(descriptor)


def _log_line(step: int, logs: dict) -> str:
    keys = ("loss", "lr", "weight_decay", "momentum", "teacher_temp", "teacher_entropy", "teacher_max_prob",
            "kl_teacher_student", "center_norm", "distinct_prototypes", "images_per_second")
    parts = [f"{key}={logs[key]:.4g}" for key in keys if key in logs]
    return f"step {step} epoch {logs['epoch']:.2f} " + " ".join(parts)


def _knn(teacher, eval_sources, args: DinoTrainingArguments, accelerator: Accelerator) -> dict:
    return knn_accuracy(teacher.backbone, eval_sources, args.eval_image_size or args.global_crops_size,
                        image_column_name=args.image_column_name, label_column_name=args.label_column_name,
                        device=accelerator.device)


def _knn_line(metrics: dict) -> str:
    return ", ".join(f"{key.removeprefix('knn_')} {value:.1f}%" for key, value in metrics.items())


def _model_card(args, teacher, step: int, iterations_per_epoch: int, state: dict):
    figures = []
    dataset = "dino_hf demo shapes" if args.demo else (args.eval_dataset_name or args.eval_train_dir or "")
    for key, value in state.get("knn", {}).items():
        if key.startswith("knn_top1@"):
            figures.append(EvalFigure(f"k-NN top-1 (k={key.split('@')[1]})", value, dataset, args.eval_split))
    datasets = [args.dataset_name or args.train_dir or ", ".join(args.data_files or []) or "dino_hf demo shapes"]
    return render_model_card(
        teacher.backbone,
        args.hub_model_id or Path(args.output_dir).name,
        training_args=args.to_dict(),
        datasets=datasets,
        steps=step,
        epochs=round(step / iterations_per_epoch, 2),
        evaluation=figures,
    )


__all__ = ["NonFiniteLossError", "TrainResult", "train"]
