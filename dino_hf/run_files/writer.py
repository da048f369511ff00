"""Writing a run's checkpoints and its teacher export, on one process or many.

`CheckpointWriter.save(step, state)` is the whole protocol of `dino_hf.run_files.checkpoints`: a fresh
staging folder, each process's own state (RNG, data position), the shared state written by the main
process (whole weights gathered from the shards under FSDP, the optimiser, the center, the run state,
the resolved arguments and the teacher export with its model card), then the rename into place. An
error on any process is raised on every process as `CheckpointError`, the previous checkpoint intact.
"""

import copy
import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ..convert.export import export_backbone
from ..convert.zero_shot import ZERO_SHOT_DIR, export_zero_shot
from ..evaluation.knn import figure_name, guarded_figure
from ..hub.model_card import EvalFigure, render_model_card
from ..hub.push import HubPusher
from ..models.distill_projector import HEADS_DIR, TeacherHeads
from ..models.lora import base_pointers, merged_backbone, own_state, save_adapter, setup_of, with_base_of
from ..models.normalization import normalization_of
from . import checkpoints
from .collectives import on_every_process
from .state import RunState
from .whole_weights import whole_optimizer_state_dict, whole_state_dict

DEMO_DATASET = "dino_hf demo shapes"


class CheckpointWriter:
    """Checkpoints and exports of one run. `last` is the newest checkpoint written (or resumed from);
    `export_dir` is where the last teacher is exported, `best_export_dir` the teacher of the best k-NN.

    `args`: the run's settings (`DinoTrainingArguments`); `epoch_of(step)`: the epoch a step ends in (the
    plan's); `rebuild_start()`: the student's backbone as the run started, built again (a LoRA run that holds its
    base in low precision reads it in full precision from there); `base_model`: the weights a distilled student
    started from, for its model card (None: a transformers backbone's card reads its own source).

    `teacher`: the EMA network, None in a distillation run without one. `whole_teacher`: under FSDP, a whole
    copy of the teacher (of the student, without a teacher) on the main process, made before the
    teacher was sharded, that gathered weights are loaded into for the k-NN and the export; otherwise
    the teacher itself. `anchor`: the run's Gram teacher (`dino_hf.objectives.anchor`: the frozen starting
    backbone or the EMA teacher's last snapshot), whole on every process, saved with each checkpoint;
    None when anchoring is off. `ibot_loss`: the run's iBOT loss (its patch center), saved with each
    checkpoint; None when iBOT is off. `distillation`: the run's distillation term (its queue and frozen
    model's name and hash go into each checkpoint, and it names the student's export); None without.
    `zero_shot_index`: which of several frozen models' text tower the zero-shot export takes (`--distill_zero_shot`).

    A distillation run exports the student (`student_backbone`, `student_backbone_best`), or with
    `--distill_ema_student` its EMA, which the teacher network holds; a DINO run exports the teacher.

    A LoRA run (`dino_hf.models.lora`) writes no frozen base weight into its checkpoints, only the name and
    hash of the base; it exports the teacher with its adapters merged (`teacher_backbone`) and as a peft
    adapter (`teacher_adapter`, pushed to the repository `<hub_model_id>-adapter` with `--push_adapter`).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        args,
        *,
        epoch_of: Callable[[int], float],
        rebuild_start: Callable[[], nn.Module],
        base_model: str | None,
        student: nn.Module,
        teacher: nn.Module,
        whole_teacher: nn.Module,
        dino_loss: nn.Module,
        optimizer,
        batches,
        pusher: HubPusher | None,
        anchor: nn.Module | None = None,
        ibot_loss: nn.Module | None = None,
        distillation=None,
        zero_shot_index: int | None = None,
    ):
        self.accelerator, self.args, self.epoch_of = accelerator, args, epoch_of
        self.rebuild_start, self.base_model = rebuild_start, base_model
        self.student, self.teacher, self.whole_teacher = student, teacher, whole_teacher
        self.dino_loss, self.optimizer, self.batches, self.pusher = dino_loss, optimizer, batches, pusher
        self.anchor = anchor
        self.ibot_loss = ibot_loss
        self.distillation = distillation
        self.zero_shot_index = zero_shot_index
        self.exports_student = distillation is not None and not args.distill_ema_student
        self.exported_name = "teacher" if distillation is None else "student"
        self.output_dir = Path(args.output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.export_dir = self.output_dir / f"{self.exported_name}_backbone"
        # The network of the best k-NN measured so far (`dino_hf.training.guard`), beside the last one.
        self.best_export_dir = self.output_dir / f"{self.exported_name}_backbone_best"
        self.last: Path | None = None
        self.lora = setup_of(accelerator.unwrap_model(student))
        self.adapter_pusher = None
        if pusher is not None and args.push_adapter:
            self.adapter_pusher = HubPusher(
                f"{args.hub_model_id}-adapter", token=args.hub_token, private=args.hub_private_repo
            )

    def gathered_teacher(self, weights: dict | None = None) -> nn.Module:
        """The teacher as one module on the main process (a collective under FSDP, where the gathered
        `weights` are loaded into the whole copy; they are gathered here when not given). A LoRA run that holds
        its base in low precision gives the main process a copy with the base in full precision
        (`full_precision`)."""
        if not self.accelerator.is_fsdp2:
            return self.full_precision(self.teacher) if self.accelerator.is_main_process else self.teacher
        weights = whole_state_dict(self.teacher) if weights is None else weights
        if self.accelerator.is_main_process:
            self.whole_teacher.load_state_dict(weights)
        return self.whole_teacher

    def network_at_start(self) -> nn.Module:
        """The exported network before the first step, on the main process; no collective (under FSDP the whole
        copy still holds the start)."""
        return self.full_precision(self.whole_teacher)

    def full_precision(self, network: nn.Module) -> nn.Module:
        """`network` as the k-NN and the export take it: itself, or for a LoRA run that holds its frozen base in
        low precision (`lora.hold_base_in_`), a copy with the base read again from the start in full precision
        (`lora.with_base_of`; the global random state is left as it was)."""
        if self.lora is None or self.lora.base_dtype is None:
            return network
        with torch.random.fork_rng(devices=[]):
            start = self.rebuild_start()
        return with_base_of(network, start)

    def exported(self, weights: dict | None = None) -> nn.Module:
        """The network the run exports and evaluates, as one module on the main process: the teacher, or
        the student of a distillation run (a collective under FSDP, where the gathered weights, given as
        `weights` {"teacher": ..., "student": ...} or gathered here, are loaded into the whole copy)."""
        if not self.exports_student:
            return self.gathered_teacher((weights or {}).get("teacher"))
        student = self.accelerator.unwrap_model(self.student)
        if not self.accelerator.is_fsdp2:
            return student
        state = (weights or {}).get("student") or whole_state_dict(student)
        if self.accelerator.is_main_process:
            self.whole_teacher.load_state_dict(state)
        return self.whole_teacher

    def save(
        self, step: int, state: RunState, teacher_state: dict | None = None, exported: nn.Module | None = None
    ) -> Path:
        """Checkpoint of `step` (every process calls it). `teacher_state`: the teacher's whole weights
        when they were gathered already; `exported`: the network of `exported()` at this step, when the caller
        has it already. Pushes the export to the Hub when a pusher is set."""
        accelerator = self.accelerator
        staging = checkpoints.staging_dir(self.checkpoints_dir, step)
        final = self.checkpoints_dir / f"checkpoint-{step}"
        weights = self._whole_weights(teacher_state)
        export_network = self.exported(weights) if exported is None else exported

        def fresh_staging() -> None:  # a killed earlier attempt may have left files of its own there
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

        def shared_state() -> None:
            self.export(export_network, staging / self.export_dir.name, step, state)
            checkpoints.write_shared_state(
                staging,
                student_state=weights["student"],
                teacher_state=weights["teacher"],
                loss_state=self.dino_loss.state_dict() if self.dino_loss is not None else None,
                optimizer_state=weights["optimizer"],
                scaler_state=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                trainer_state=state.to_dict(),
                training_args=self.args.to_dict(),
                anchor_state=self._anchor_state(),
                ibot_state=self.ibot_loss.state_dict() if self.ibot_loss is not None else None,
                distill_state=self._distill_state(),
                lora_base=self.lora.metadata() if self.lora is not None else None,
            )
            checkpoints.finalize(staging, self.checkpoints_dir, step, self.args.checkpoints_total_limit)

        try:
            on_every_process(accelerator, fresh_staging, main_only=True)
            on_every_process(
                accelerator,
                lambda: checkpoints.write_process_state(staging, accelerator.process_index, self.batches.state_dict()),
            )
            on_every_process(accelerator, shared_state, main_only=True)
        except checkpoints.WRITE_ERRORS as error:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            raise checkpoints.CheckpointError(
                f"could not write the checkpoint of step {step} to {final}: {str(error).rstrip('.')}. The previous "
                f"checkpoint {self.last or '(none: this was the first)'} is intact; "
                f"{checkpoints.write_error_advice(error, self.checkpoints_dir)}, then resume with "
                "--resume_from_checkpoint latest"
            ) from error
        if self.pusher is not None:
            self.push(final, f"Training step {step}")
        self.last = final
        return final

    def _distill_state(self) -> tuple[dict, dict] | None:
        """The queue, with the frozen model's name and weight hash (what a resume is checked against)."""
        if self.distillation is None:
            return None
        return self.distillation.state_dict(), self.distillation.metadata()

    def _whole_weights(self, teacher_state: dict | None) -> dict:
        """Whole weights for the main process to write: gathered from the shards under FSDP (every
        process takes part), copied by the main process alone otherwise."""
        if not (self.accelerator.is_fsdp2 or self.accelerator.is_main_process):
            return {}
        student = self.accelerator.unwrap_model(self.student)
        if self.lora is not None:  # never sharded (FSDP is refused with LoRA): the tensors that are not the base
            base = base_pointers(student.backbone)
            return {
                "student": own_state(student, base),
                "teacher": own_state(self.teacher, base),
                "optimizer": whole_optimizer_state_dict(student, self.optimizer),
            }
        if self.teacher is not None and teacher_state is None:
            teacher_state = whole_state_dict(self.teacher)
        return {
            "student": whole_state_dict(student),
            "teacher": teacher_state,
            "optimizer": whole_optimizer_state_dict(student, self.optimizer),
        }

    def _anchor_state(self) -> dict | None:
        """The anchor's weights; with LoRA, those that are not the base it shares with the student."""
        if self.anchor is None:
            return None
        if self.lora is None:
            return self.anchor.state_dict()
        return own_state(self.anchor, base_pointers(self.accelerator.unwrap_model(self.student).backbone))

    def push(self, checkpoint: Path, message: str) -> None:
        """Queue the upload of `checkpoint`'s export (and of its adapter with `--push_adapter`)."""
        self.pusher.push(checkpoint / self.export_dir.name, message)
        if self.adapter_pusher is not None:
            self.adapter_pusher.push(checkpoint / adapter_name(self.export_dir.name), message)

    def export(self, teacher: nn.Module, folder: Path, step: int, state: RunState) -> None:
        """The backbone of `teacher` (the exported network, `exported`) as a model folder with its model card
        (main process). A run distilled from several frozen models also exports the student's heads for each
        (`student_heads/<teacher>/`) beside it and, with `--distill_zero_shot`, at the run's end (`folder` is
        `export_dir`), the zero-shot classifier (`student_zero_shot/`)."""
        self._export(teacher, folder, step, state)
        teachers = getattr(self.distillation, "teachers", None)
        if teachers is None:
            return
        self._export_heads(teacher, teachers, folder.parent / HEADS_DIR)
        if self.args.distill_zero_shot and folder == self.export_dir:
            self._export_zero_shot(teacher, teachers, folder.parent / ZERO_SHOT_DIR)

    def _export_heads(self, network: nn.Module, teachers, folder: Path) -> None:
        """Each frozen model's summary and feature heads with the inverse of its balancing, in its own folder."""
        for teacher, projector in zip(teachers, network.distill_projector, strict=True):
            weight, bias = teacher.balancing.inverse_affine()
            feature_dim, patch_dim = projector.in_dims
            config = {
                **teacher.describe(),
                "kind": self.args.distill_projector,
                "student_feature_dim": feature_dim,
                "student_patch_dim": patch_dim,
            }
            TeacherHeads(copy.deepcopy(projector).cpu(), weight.cpu(), bias.cpu(), config).save(folder / teacher.name)

    def _export_zero_shot(self, network: nn.Module, teachers, folder: Path) -> None:
        """The student with its summary head for the first text-aligned frozen model whose text tower exports, and
        that tower (`dino_hf.convert.zero_shot.export_zero_shot`)."""
        index = self.zero_shot_index
        teacher = teachers[index]
        mean, std = normalization_of(network.backbone)
        export_zero_shot(
            network.backbone,
            network.distill_projector[index].global_projection,
            teacher.frozen.source,
            folder,
            image_size=self.args.global_crops_size,
            image_mean=mean,
            image_std=std,
        )

    def export_best(self, teacher: nn.Module, step: int, state: RunState) -> None:
        """`teacher`, of the best k-NN measured so far (`state.knn_best`, at `step`), to `best_export_dir`;
        its model card gives those figures and says which teacher it is (main process)."""
        knn = state.knn_best
        key = guarded_figure(knn)
        note = (
            f"The {self.exported_name} of the best k-NN measured during its run: step {step}, {figure_name(key)} "
            f"{knn[key]:.1f} % (the run's last {self.exported_name} is in {self.export_dir.name}/)."
        )
        self._export(teacher, self.best_export_dir, step, dataclasses.replace(state, knn=knn), note)

    def _export(self, teacher: nn.Module, folder: Path, step: int, state: RunState, note: str = "") -> None:
        """`teacher`'s backbone to `folder` with its model card (`note` after the title); a LoRA teacher's with
        its adapters merged, and its peft adapter beside it (`adapter_name`)."""
        backbone, trained = teacher.backbone, None
        if self.lora is not None:
            save_adapter(backbone, self.lora, folder.with_name(adapter_name(folder.name)))
            trained = self.lora.describe(backbone.model)
            backbone = merged_backbone(backbone)
        card = self._model_card(backbone, step, state, trained)
        if note:
            title, _, rest = card.text.partition("\n\n")
            card.text = f"{title}\n\n{note}\n\n{rest}"
        export_backbone(backbone, folder, image_size=self.args.global_crops_size, model_card=card)

    def _model_card(self, backbone: nn.Module, step: int, state: RunState, trained: str | None = None):
        args = self.args
        dataset = DEMO_DATASET if args.demo else (args.eval_dataset_name or args.eval_train_dir or "")
        figures = [
            EvalFigure(f"k-NN top-1 (k={key.split('@')[1]})", value, dataset, args.eval_split)
            for key, value in state.knn.items()
            if key.startswith("knn_top1@")
        ]
        datasets = [args.dataset_name or args.train_dir or ", ".join(args.data_files or []) or DEMO_DATASET]
        return render_model_card(
            backbone,
            args.hub_model_id or str(self.export_dir),
            title=(args.hub_model_id or self.output_dir.name).rstrip("/").split("/")[-1],
            training_args=args.settings_in_effect(),
            datasets=datasets,
            steps=step,
            epochs=round(self.epoch_of(step), 2),
            evaluation=figures,
            image_size=args.global_crops_size,
            base_model=self.base_model,
            distilled_from=list(args.distill_from or []),
            ema_student=args.distill_ema_student,
            trained_parameters=trained,
        )


def adapter_name(export_name: str) -> str:
    """The folder of a LoRA run's peft adapter beside its export: `teacher_adapter` beside `teacher_backbone`."""
    return export_name.replace("backbone", "adapter")


__all__ = ["CheckpointWriter", "adapter_name"]
