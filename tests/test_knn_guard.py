"""The k-NN guard: the best teacher kept as OUTPUT_DIR/teacher_backbone_best, and `--stop_if_knn_drops`.

The drop is forced: the run starts (`--init_from_checkpoint`) from a checkpoint whose student lost its
patch embedding (zeros: its features no longer depend on the image) while its teacher is whole. With
`--momentum_teacher 0` the teacher takes the student's weights at the first step (whose learning rate
is 0, the warm-up's start), so the k-NN of the colour classes falls from 100 % (the start) to chance,
50 %, at the first evaluation.
"""

import json
import shutil

import pytest
import torch
from runs import TINY, cli_arguments, run_cli, saved, train_in_process, trainer_state
from safetensors.torch import load_file, save_file

from dino_hf import DinoModel
from dino_hf.evaluation.knn import figure_name, guarded_figure
from dino_hf.run_files.state import RunState
from dino_hf.training.arguments import DinoTrainingArguments
from dino_hf.training.guard import Verdict, has_dropped, is_new_best, observe
from dino_hf.training.trainer import start_name

PATCH_EMBEDDING = "backbone.model.embeddings.patch_embeddings.projection"


def test_the_guarded_figure_is_top1_at_k20_else_the_first_top1():
    assert guarded_figure({"knn_top1@10": 1.0, "knn_top5@20": 2.0, "knn_top1@20": 3.0}) == "knn_top1@20"
    assert guarded_figure({"knn_top5@10": 2.0, "knn_top1@10": 1.0}) == "knn_top1@10"  # a bank of 10 to 19 images
    assert guarded_figure({}) is None
    assert figure_name("knn_top1@20") == "k-NN top-1 (k=20)"


def test_the_decision_functions():
    assert is_new_best(50.0, None) and is_new_best(50.1, 50.0)
    assert not is_new_best(50.0, 50.0)  # a tie keeps the earlier step
    assert has_dropped(40.0, 50.0, 10.0) and has_dropped(39.0, 50.0, 10.0)
    assert not has_dropped(40.1, 50.0, 10.0)
    assert not has_dropped(0.0, 50.0, None)  # no guard
    assert not has_dropped(0.0, None, 10.0)  # nothing to fall from


def test_observe_keeps_the_best_and_stops_on_a_drop():
    state = RunState()
    assert observe(state, {"knn_top1@20": 60.0, "knn_top5@20": 90.0}, 0, 10.0) == Verdict(new_best=True)
    assert observe(state, {"knn_top1@20": 70.0}, 5, 10.0) == Verdict(new_best=True)
    assert (state.knn_best, state.knn_best_step) == ({"knn_top1@20": 70.0}, 5)
    assert observe(state, {"knn_top1@20": 60.5}, 10, 10.0) == Verdict()  # 9.5 points below: goes on
    verdict = observe(state, {"knn_top1@20": 60.0}, 15, 10.0)
    assert not verdict.new_best
    assert verdict.stop == (
        "k-NN top-1 (k=20) 60.0% at step 15 is 10.0 points below its best, 70.0% at step 5 (--stop_if_knn_drops 10)"
    )
    assert observe(state, {"knn_top1@20": 0.0}, 20, None) == Verdict()  # no --stop_if_knn_drops: never stops
    assert observe(state, {}, 25, 10.0) == Verdict()  # no top-1 figure (a bank under 10 images)
    assert (state.knn_best, state.knn_best_step) == ({"knn_top1@20": 70.0}, 5)


def test_the_best_survives_the_run_state_round_trip():
    state = RunState(global_step=7, knn_start={"knn_top1@20": 55.0}, knn_best={"knn_top1@20": 61.0}, knn_best_step=4)
    restored = RunState.from_dict(json.loads(json.dumps(state.to_dict())))  # as trainer_state.json keeps it
    assert restored == state


def test_the_step_0_teacher_is_named_by_where_the_weights_come_from(data, trained_run):
    common = dict(train_dir=str(data / "images"), global_crops_size=32, local_crops_size=16)
    assert start_name(DinoTrainingArguments(model_name_or_path=str(data / "model"), **common)) == "starting"
    assert start_name(DinoTrainingArguments(init_from_checkpoint=str(trained_run), **common)) == "starting"
    assert start_name(DinoTrainingArguments(model_name_or_path="vit_small_patch16", **common)) == "random-init"
    assert start_name(DinoTrainingArguments(backbone="timm:resnet18", **common)) == "random-init"


@pytest.fixture(scope="module")
def broken_start(trained_run, tmp_path_factory):
    """A copy of `trained_run` whose student's patch embedding is zeros (the same file size: its manifest
    still holds)."""
    run = tmp_path_factory.mktemp("broken_start") / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    student_file = run / "checkpoints" / "checkpoint-2" / "student.safetensors"
    student = load_file(student_file)
    for name in (f"{PATCH_EMBEDDING}.weight", f"{PATCH_EMBEDDING}.bias"):
        student[name] = torch.zeros_like(student[name])
    save_file(student, student_file)
    return run


def guarded_run(data, labelled_images, start, output_dir) -> dict:
    return dict(
        train_dir=str(data / "images"),
        init_from_checkpoint=str(start),
        output_dir=str(output_dir),
        eval_train_dir=str(labelled_images),
        eval_steps=1,
        momentum_teacher=0.0,
        stop_if_knn_drops=10.0,
    )


def backbone_of(checkpoint_teacher: dict) -> dict:
    prefix = "backbone.model."
    return {
        name.removeprefix(prefix): tensor for name, tensor in checkpoint_teacher.items() if name.startswith(prefix)
    }


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_a_drop_stops_the_run_with_a_checkpoint_and_keeps_the_start_as_the_best(
    data, labelled_images, broken_start, tmp_path
):
    out = tmp_path / "out"
    result = train_in_process(**guarded_run(data, labelled_images, broken_start, out))
    assert result.global_step == 1  # of 8: stopped at the first evaluation
    assert result.knn_stop == (
        "k-NN top-1 (k=20) 50.0% at step 1 is 50.0 points below its best, 100.0% at step 0 (--stop_if_knn_drops 10)"
    )
    assert (result.start, result.knn_start["knn_top1@20"], result.knn["knn_top1@20"]) == ("starting", 100.0, 50.0)
    assert (result.knn_best_step, result.best_export_dir) == (0, out / "teacher_backbone_best")

    checkpoint = out / "checkpoints" / "checkpoint-1"
    assert result.checkpoint == checkpoint and (checkpoint / "manifest.json").is_file()
    state = trainer_state(checkpoint)  # what a resume restores
    assert (state["knn_best_step"], state["knn_best"]["knn_top1@20"]) == (0, 100.0)

    start_teacher = backbone_of(saved(broken_start / "checkpoints" / "checkpoint-2", "teacher"))
    assert_same(DinoModel.from_pretrained(out / "teacher_backbone_best").state_dict(), start_teacher)
    last = DinoModel.from_pretrained(out / "teacher_backbone").state_dict()  # the final export: the stopped teacher
    assert_same(last, backbone_of(saved(checkpoint, "teacher")))
    assert not last["embeddings.patch_embeddings.projection.weight"].any()
    card = (out / "teacher_backbone_best" / "README.md").read_text()
    assert "The teacher of the best k-NN measured during its run: step 0, k-NN top-1 (k=20) 100.0 %" in card


def test_without_the_flag_the_run_goes_on_and_keeps_the_best(data, labelled_images, broken_start, tmp_path):
    options = guarded_run(data, labelled_images, broken_start, tmp_path / "out")
    result = train_in_process(**{**options, "stop_if_knn_drops": None, "eval_steps": 4})
    assert result.global_step == 8 and result.knn_stop is None
    assert result.knn_best_step == 0  # the start stays the best: the features never depend on the image again
    start_teacher = backbone_of(saved(broken_start / "checkpoints" / "checkpoint-2", "teacher"))
    assert_same(DinoModel.from_pretrained(tmp_path / "out" / "teacher_backbone_best").state_dict(), start_teacher)


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "set together with --eval_steps N"),
        ({"eval_steps": 2, "stop_if_knn_drops": 0.0}, "points of k-NN top-1 accuracy > 0"),
    ],
)
def test_the_flag_needs_evaluations(data, labelled_images, options, message):
    with pytest.raises(ValueError, match=message):
        DinoTrainingArguments(
            train_dir=str(data / "images"),
            model_name_or_path=str(data / "model"),
            eval_train_dir=str(labelled_images),
            **{"stop_if_knn_drops": 5.0, **options},
        )


@pytest.mark.slow
def test_the_guard_through_the_cli(data, labelled_images, broken_start, tmp_path):
    out = tmp_path / "out"
    options = {**TINY, **guarded_run(data, labelled_images, broken_start, out)}
    for name in ("out_dim", "head_hidden_dim", "head_bottleneck_dim"):
        options.pop(name)  # taken from the checkpoint
    completed = run_cli(*cli_arguments(options))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    lines = completed.stdout.splitlines()
    assert "k-NN top-1 (k=20): starting teacher 100.0% -> trained teacher 50.0%" in lines
    assert (
        "Stopped early: k-NN top-1 (k=20) 50.0% at step 1 is 50.0 points below its best, 100.0% at step 0 "
        "(--stop_if_knn_drops 10)." in lines
    )
    best = out / "teacher_backbone_best"
    assert f"The teacher of the best k-NN top-1 (k=20), 100.0% at step 0, is in {best}." in lines
    assert (out / "checkpoints" / "checkpoint-1" / "manifest.json").is_file()
    start_teacher = backbone_of(saved(broken_start / "checkpoints" / "checkpoint-2", "teacher"))
    assert_same(DinoModel.from_pretrained(best).state_dict(), start_teacher)


@pytest.mark.slow
def test_a_random_init_run_names_its_step_0_teacher_so(data, labelled_images, tmp_path):
    tiny_preset = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,patch_size=8"
    options = {
        **TINY,
        "train_dir": str(data / "images"),
        "model_name_or_path": "vit_small_patch16",
        "config_overrides": tiny_preset,
        "output_dir": str(tmp_path / "out"),
        "eval_train_dir": str(labelled_images),
        "max_train_steps": 1,
    }
    completed = run_cli(*cli_arguments(options))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "k-NN of the random-init teacher at 32 px: " in completed.stdout
    assert "k-NN top-1 (k=20): random-init teacher " in completed.stdout
    assert (tmp_path / "out" / "teacher_backbone_best" / "config.json").is_file()  # the start is the first best
