"""The training loop, run in this process on a tiny DinoModel and 24 generated images.

The process-level behaviours (a real `accelerate launch`, two processes, SIGKILL, SIGTERM) are in
tests/test_pretrain_script.py. `python tests/test_trainer.py ddp-worker OUT` is the worker of
`test_ddp_step_matches_one_process_step`, started under `accelerate launch` with 2 processes.
"""

import copy
import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from processes import accelerate_launch, assert_trains_as_one_process
from safetensors.torch import load_file

from dino_hf import DinoModel
from dino_hf.convert.export import save_as_timm
from dino_hf.models.backbones import TimmBackbone, build_backbone
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.objectives.dino import DinoLoss
from dino_hf.run_files import checkpoints as checkpointing
from dino_hf.training import trainer
from dino_hf.training.arguments import DinoTrainingArguments
from dino_hf.training.networks import build_student_teacher
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.step import StepValues, train_step
from dino_hf.training.teacher import build_teacher
from dino_hf.training.trainer import NonFiniteLossError, train

# 24 images, batch 4: a pass over the data (a data epoch) is 6 steps; an epoch of the schedules is
# 16 samples = 4 steps, so 2 epochs = 8 steps, and step 6 ends a pass mid-epoch.
TINY = dict(
    global_crops_size=32,
    local_crops_size=16,
    local_crops_number=2,
    out_dim=64,
    head_hidden_dim=32,
    head_bottleneck_dim=16,
    per_device_train_batch_size=4,
    dataloader_num_workers=0,
    samples_per_epoch=16,
    shuffle_buffer_size=8,
    num_train_epochs=2,
    checkpointing_steps="2",
    logging_steps=4,
)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(data: Path, output_dir: Path, **overrides) -> trainer.TrainResult:
    options = {
        **TINY,
        "train_dir": str(data / "images"),
        "model_name_or_path": str(data / "model"),
        "output_dir": str(output_dir),
        **overrides,
    }
    try:
        return train(DinoTrainingArguments(**options))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def teacher_at(output_dir: Path, step: int) -> dict:
    return load_file(output_dir / "checkpoints" / f"checkpoint-{step}" / "teacher.safetensors")


def read_ids(path: Path) -> dict:
    """step -> ids of the batch that step trained on (the last one read, for a retried step)."""
    return {row["step"]: row["ids"] for row in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 8-step run."""
    folder = tmp_path_factory.mktemp("reference")
    result = run(data, folder / "out", log_sample_ids=str(folder / "ids.jsonl"))
    return folder, result


def test_run_writes_checkpoints_and_export(reference):
    folder, result = reference
    assert result.global_step == 8 and result.stopped_by is None
    assert [p.name for p in checkpointing.list_checkpoints(folder / "out" / "checkpoints")] == [
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]  # the last 3 are kept
    checkpointing.check_checkpoint(result.checkpoint)
    assert DinoModel.from_pretrained(result.export_dir).config.hidden_size == 32
    ids = read_ids(folder / "ids.jsonl")
    assert sorted(ids) == list(range(8)) and all(len(batch) == 4 for batch in ids.values())
    first_pass = [name for step in range(6) for name in ids[step]]
    assert len(set(first_pass)) == 24  # a pass over the data sees every image once


def test_signal_checkpoints_and_resume_matches_uninterrupted_run(data, reference, tmp_path, monkeypatch):
    calls = []

    def step_then_signal(*args, **kwargs):
        metrics = train_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 6:  # during step index 5: stop after step 6, the end of a pass over the data
            os.kill(os.getpid(), signal.SIGUSR1)
        return metrics

    def previous_handler(signum, frame):
        raise AssertionError("the trainer's handler should have been installed")

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    saved_handler = signal.signal(signal.SIGUSR1, previous_handler)
    try:
        stopped = run(data, tmp_path / "out", log_sample_ids=str(tmp_path / "ids.jsonl"))
        assert signal.getsignal(signal.SIGUSR1) is previous_handler  # restored after the run
    finally:
        signal.signal(signal.SIGUSR1, saved_handler)
    assert (stopped.stopped_by, stopped.global_step) == ("SIGUSR1", 6)
    assert stopped.checkpoint == tmp_path / "out" / "checkpoints" / "checkpoint-6"
    assert not (tmp_path / "out" / "teacher_backbone").exists()  # no final export for a stopped run
    assert torch.load(stopped.checkpoint / "data_state_0.pt", weights_only=True)["epoch"] == 0

    monkeypatch.setattr(trainer, "train_step", train_step)
    resumed = run(data, tmp_path / "out", resume_from_checkpoint="latest", log_sample_ids=str(tmp_path / "ids.jsonl"))
    assert resumed.global_step == 8
    expected, got = teacher_at(reference[0] / "out", 8), teacher_at(tmp_path / "out", 8)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert read_ids(tmp_path / "ids.jsonl") == read_ids(reference[0] / "ids.jsonl")
    state = json.loads((tmp_path / "out" / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


def test_gradient_accumulation_matches_the_full_batch(data, tmp_path):
    # Both runs read batches of 8 (per device 4 x 2 micro-batches, or 8 x 1): the same images with the
    # same augmentations. Stochastic depth is off: its masks depend on the micro-batch split. SGD, as
    # AdamW's normalised updates would hide a gradient of the wrong scale.
    common = dict(
        drop_path_rate=0.0,
        num_train_epochs=1,
        samples_per_epoch=24,
        optimizer="sgd",
        learning_rate=2.0,
        warmup_epochs=0,
        momentum_teacher=0.9,
    )
    run(
        data,
        tmp_path / "acc",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        log_sample_ids=str(tmp_path / "acc.jsonl"),
        **common,
    )
    run(data, tmp_path / "full", per_device_train_batch_size=8, log_sample_ids=str(tmp_path / "full.jsonl"), **common)
    assert read_ids(tmp_path / "acc.jsonl") == read_ids(tmp_path / "full.jsonl")
    initial = DinoModel.from_pretrained(data / "model").state_dict()
    for network in ("teacher", "student"):
        accumulated, full = (
            load_file(tmp_path / name / "checkpoints" / "checkpoint-3" / f"{network}.safetensors")
            for name in ("acc", "full")
        )
        moved = max((full[f"backbone.model.{k}"] - v).abs().max().item() for k, v in initial.items())
        assert moved > 1e-4  # the comparison below is not between two untrained networks
        for name, tensor in full.items():
            # float32 sums in another order (two backwards of 4 images against one of 8): about 1e-8
            torch.testing.assert_close(accumulated[name], tensor, rtol=0, atol=1e-6, msg=name)
    centers = [
        load_file(tmp_path / run_name / "checkpoints" / "checkpoint-3" / "dino_loss.safetensors")["center"]
        for run_name in ("acc", "full")
    ]
    torch.testing.assert_close(centers[0], centers[1], rtol=0, atol=1e-6)


def test_accumulation_step_updates_the_center_once_with_the_batch_mean():
    torch.manual_seed(0)
    backbone = build_backbone(
        "timm:test_vit", drop_path_rate=0.0, image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    student = MultiCropWrapper(backbone, DinoHead(32, out_dim=16, hidden_dim=32, bottleneck_dim=8))
    teacher = build_teacher(student)
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16)]
    step = dict(lr=0.01, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, clip_grad=3.0, freeze_last_layer=False)
    runs = []
    for accumulation_steps in (1, 2, 4):
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        loss = DinoLoss(16, 3)
        loss.center.fill_(0.3)
        stats = train_step(
            s,
            t,
            loss,
            build_optimizer("sgd", get_param_groups(s)),
            crops,
            StepValues(**step),
            accumulation_steps=accumulation_steps,
        )
        runs.append((stats["loss"].item(), loss.center.clone(), t.state_dict()))
    with torch.no_grad():
        expected_center = 0.9 * 0.3 + 0.1 * teacher(crops[:2]).mean(0, keepdim=True)
    for loss_value, center, teacher_state in runs[1:]:
        assert loss_value == pytest.approx(runs[0][0], rel=1e-6)
        torch.testing.assert_close(center, expected_center)
        for name, tensor in runs[0][2].items():
            torch.testing.assert_close(teacher_state[name], tensor, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="does not split into 3 equal micro-batches"):
        train_step(
            student,
            teacher,
            DinoLoss(16, 3),
            build_optimizer("adamw", get_param_groups(student)),
            crops,
            StepValues(**step),
            accumulation_steps=3,
        )


def nan_at_call(number: int, monkeypatch) -> None:
    """The DINO loss of the `number`-th call (1-based) becomes NaN."""
    original = DinoLoss.terms
    calls = []

    def terms(self, student_output, teacher_output, teacher_temp):
        computed = original(self, student_output, teacher_output, teacher_temp)
        calls.append(1)
        return computed._replace(loss=computed.loss * float("nan")) if len(calls) == number else computed

    monkeypatch.setattr(DinoLoss, "terms", terms)


def test_nonfinite_loss_stops_naming_the_step_and_the_last_checkpoint(data, tmp_path, monkeypatch):
    nan_at_call(4, monkeypatch)  # step index 3, after checkpoint-2
    with pytest.raises(NonFiniteLossError) as error:
        run(data, tmp_path / "out")
    message = str(error.value)
    assert message.startswith("step 3: DINO loss is nan")
    assert str(tmp_path / "out" / "checkpoints" / "checkpoint-2") in message
    assert "bf16" in message and "--skip_nonfinite_steps" in message
    checkpointing.check_checkpoint(tmp_path / "out" / "checkpoints" / "checkpoint-2")
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "out" / "checkpoints")] == ["checkpoint-2"]


def test_skip_nonfinite_steps_skips_up_to_k(data, tmp_path, monkeypatch, capsys):
    nan_at_call(4, monkeypatch)
    result = run(data, tmp_path / "out", skip_nonfinite_steps=1, log_sample_ids=str(tmp_path / "ids.jsonl"))
    assert result.global_step == 8
    assert "step 3 skipped (1 of 1 allowed by --skip_nonfinite_steps)" in capsys.readouterr().out
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["nonfinite_skipped"] == 1
    steps = [row["step"] for row in map(json.loads, (tmp_path / "ids.jsonl").read_text().splitlines())]
    # Decided on the device, as AMP's skipped steps: step 3 used its batch and its place in the
    # schedules, and changed nothing.
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7]
    assert all(torch.isfinite(t).all() for t in load_file(result.checkpoint / "teacher.safetensors").values())


def test_full_disk_when_saving_is_a_clear_error_and_keeps_the_previous(data, tmp_path, monkeypatch):
    # A file size limit makes the OS refuse writes past 100 kB (EFBIG) as a full disk would (ENOSPC);
    # it is set after checkpoint 2, so checkpoint 4 fails inside safetensors' write of the student.
    calls = []
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)

    def step_then_fill_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
        return train_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step_then_fill_the_disk)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    try:
        with pytest.raises(checkpointing.CheckpointError) as error:
            run(data, tmp_path / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    checkpoints = tmp_path / "out" / "checkpoints"
    message = str(error.value)
    assert f"could not write the checkpoint of step 4 to {checkpoints / 'checkpoint-4'}" in message
    assert "File too large" in message and f"previous checkpoint {checkpoints / 'checkpoint-2'} is intact" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]  # no half-written folder left
    checkpointing.check_checkpoint(checkpoints / "checkpoint-2")


def test_read_only_folder_when_saving_is_a_clear_error(data, tmp_path, monkeypatch):
    # Root writes through file permissions, so the read-only file system is injected where the
    # checkpoint's folder is created.
    original_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == ".checkpoint-4.tmp":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(checkpointing.CheckpointError, match="Read-only file system") as error:
        run(data, tmp_path / "out")
    checkpoints = tmp_path / "out" / "checkpoints"
    assert f"previous checkpoint {checkpoints / 'checkpoint-2'} is intact" in str(error.value)
    assert f"make {checkpoints} writable" in str(error.value)
    checkpointing.check_checkpoint(checkpoints / "checkpoint-2")


def test_fresh_head_on_trained_weights_is_warmed_up_with_the_backbone_frozen(data, tmp_path):
    run(
        data,
        tmp_path / "out",
        head_warmup_steps=2,
        max_train_steps=3,
        drop_path_rate=0.0,
        warmup_epochs=0,
        learning_rate=0.05,
    )
    initial = DinoModel.from_pretrained(data / "model").state_dict()
    at_2 = load_file(tmp_path / "out" / "checkpoints" / "checkpoint-2" / "student.safetensors")
    at_3 = load_file(tmp_path / "out" / "checkpoints" / "checkpoint-3" / "student.safetensors")
    for name, tensor in initial.items():
        assert torch.equal(at_2[f"backbone.model.{name}"], tensor), name  # frozen during the warm-up
    assert any(not torch.equal(at_3[f"backbone.model.{name}"], tensor) for name, tensor in initial.items())
    # the head trained during the warm-up (step 0 has lr 0: step 1 moved it)
    teacher_2 = load_file(tmp_path / "out" / "checkpoints" / "checkpoint-2" / "teacher.safetensors")
    head_moves = [(at_2[k] - teacher_2[k]).abs().max().item() for k in at_2 if k.startswith("head.mlp")]
    assert max(head_moves) > 1e-4


def test_which_backbones_get_a_head_warmup(data, tmp_path, caplog):
    def fresh_head(**options):
        args = DinoTrainingArguments(**{**TINY, "train_dir": str(data / "images"), **options})
        return build_student_teacher(args)[2]

    assert fresh_head(model_name_or_path=str(data / "model"))  # trained weights, no head
    assert not fresh_head(model_name_or_path="vit_tiny_patch16", global_crops_size=32)  # random preset
    assert not fresh_head(backbone="timm:test_vit")  # random timm model

    class ModelsBuilt(Exception):
        pass

    def stop(*args, **kwargs):
        raise ModelsBuilt

    with caplog.at_level("WARNING", logger="dino_hf.training.trainer"):
        with pytest.raises(ModelsBuilt):  # stop right after the models are built
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(trainer, "load_image_stream", stop)
                train(
                    DinoTrainingArguments(
                        **{
                            **TINY,
                            "train_dir": str(data / "images"),
                            "model_name_or_path": str(data / "model"),
                            "output_dir": str(tmp_path / "out"),
                        }
                    )
                )
    assert "consider --head_warmup_steps" in caplog.text


def test_trained_timm_weights_continue_pretraining_with_a_head_warmup(data, tmp_path):
    """--model_name_or_path on a folder saved by timm (what timm:NAME pretrained weights are once
    downloaded): the backbone is that timm model with those weights, and its head is fresh."""
    save_as_timm(DinoModel.from_pretrained(data / "model"), tmp_path / "timm")
    args = DinoTrainingArguments(
        **{**TINY, "train_dir": str(data / "images"), "model_name_or_path": str(tmp_path / "timm")}
    )
    student, teacher, fresh_head = build_student_teacher(args)
    assert fresh_head and isinstance(student.backbone, TimmBackbone)
    saved = load_file(tmp_path / "timm" / "model.safetensors")
    weights = student.backbone.model.state_dict()
    assert saved.keys() == weights.keys()
    for name, tensor in saved.items():
        assert torch.equal(weights[name], tensor), name
    with pytest.raises(
        ValueError,
        match="--model_name_or_path='timm:vit_smal_patch16_224.dino' is not valid: a "
        "model name that timm knows.*closest: timm:vit_small_patch16_224",
    ):
        DinoTrainingArguments(
            **{**TINY, "train_dir": str(data / "images"), "model_name_or_path": "timm:vit_smal_patch16_224.dino"}
        )


def test_crop_size_against_a_timm_patch_size_fails_before_any_work(data, tmp_path):
    args = DinoTrainingArguments(
        **{
            **TINY,
            "train_dir": str(data / "images"),
            "backbone": "timm:test_vit",
            "local_crops_size": 24,
            "output_dir": str(tmp_path / "out"),
        }
    )
    with pytest.raises(
        ValueError, match="--local_crops_size=24 is not valid: a multiple of the backbone's patch size 16"
    ):
        train(args)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Two processes (gloo): DDP of the student, center all-reduce, no_sync during accumulation


def ddp_setup():
    """The same networks, center and 3 global batches of 8 images on every process."""
    torch.manual_seed(0)
    backbone = build_backbone(
        "timm:test_vit", drop_path_rate=0.0, image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    student = MultiCropWrapper(backbone, DinoHead(32, out_dim=64, hidden_dim=48, bottleneck_dim=16))
    teacher = build_teacher(student)
    dino_loss = DinoLoss(64, 4)
    dino_loss.center.copy_(0.1 * torch.randn(1, 64))
    batches = [
        [torch.randn(8, 3, 32, 32) for _ in range(2)] + [torch.randn(8, 3, 16, 16) for _ in range(2)] for _ in range(3)
    ]
    return student, teacher, dino_loss, batches


DDP_STEP = dict(lr=0.01, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, clip_grad=3.0, freeze_last_layer=False)


def ddp_worker(out: Path) -> None:
    from accelerate import Accelerator
    from torch.nn.parallel import DistributedDataParallel

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    student, teacher, dino_loss, batches = ddp_setup()
    optimizer = build_optimizer("sgd", get_param_groups(student))
    student, optimizer = accelerator.prepare(student, optimizer)
    assert (
        world == 2
        and isinstance(student, DistributedDataParallel)
        and not isinstance(teacher, DistributedDataParallel)
    )
    losses = []
    for crops in batches:
        local = [crop.chunk(world)[rank] for crop in crops]  # this process's 4 images of the 8
        stats = train_step(
            student,
            teacher,
            dino_loss,
            optimizer,
            local,
            StepValues(**DDP_STEP),
            accelerator=accelerator,
            accumulation_steps=2,
        )  # 2 micro-batches of 2: no_sync on the first
        losses.append(stats["loss"])
    torch.save({"teacher": teacher.state_dict(), "center": dino_loss.center, "losses": losses}, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_step_matches_one_process_step(tmp_path):
    """2 processes x 4 images (each in 2 micro-batches) against 1 process x 8 images, 3 steps.

    Same networks and crops on both sides, stochastic depth off, so only float summation order
    differs: DDP averages the two processes' gradients where one process sums over 8 images, and
    the center's sum is all-reduced. SGD (lr 0.01, momentum 0.9) keeps the update proportional to
    the gradient, so twice the gradient (summed instead of averaged) would show; AdamW's
    normalised update would hide it. The teachers then agree to about 1e-8; the tolerance 1e-6 is
    far below what the 3 steps move the teacher (> 1e-4), so a wrong averaging or a center synced
    wrongly fails.
    """
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        *accelerate_launch(2),
        __file__,
        "ddp-worker",
        str(tmp_path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, tensor in rank0["teacher"].items():
        assert torch.equal(rank1["teacher"][name], tensor), name  # the replicas stay identical
    assert torch.equal(rank0["center"], rank1["center"])

    assert_trains_as_one_process(rank0, ddp_setup, DDP_STEP)


if __name__ == "__main__" and sys.argv[1:2] == ["ddp-worker"]:
    ddp_worker(Path(sys.argv[2]))


def test_augment_on_device_and_speed_options_train_and_resume_exactly(data, tmp_path, monkeypatch):
    """--augment_on gpu (here on the CPU device) with the fused optimiser: the workers send capped
    uint8 images, the crops are made in batch on the device, and a resumed run makes the same crops
    (they are seeded by the step) and ends with the same teacher."""
    options = dict(augment_on="gpu", augment_cap_size=40, max_train_steps=4, checkpointing_steps="2")
    full = run(data, tmp_path / "full", **options)
    assert full.global_step == 4
    resumed_dir = tmp_path / "resumed"
    run(data, resumed_dir, **{**options, "max_train_steps": 2})
    resumed = run(data, resumed_dir, **options, resume_from_checkpoint="latest")
    assert resumed.global_step == 4
    expected, got = teacher_at(tmp_path / "full", 4), teacher_at(resumed_dir, 4)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
