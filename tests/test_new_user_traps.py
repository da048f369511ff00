"""Traps a new user falls into (issue 32), each through the scripts' command line: a run whose backbone
never trains, bf16 on a machine without a GPU, an abbreviated or mistyped flag, a k-NN k larger than the
train set, a CNN given to a ViT-only script, more DataLoader workers than cores, a setting that the
others leave without effect, and a progress bar written to a pipe."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from runs import ENV, TINY, cli_arguments, pretrain_arguments, pretrain_main, reset_accelerate
from timm.models import save_for_hf

from dino_hf.command_line import closest_flag
from dino_hf.evaluation import cli
from dino_hf.training import plan as plan_module
from dino_hf.training.arguments import DinoTrainingArguments, parse_training_args, refuse_settings_without_effect
from dino_hf.training.console import PlainProgress
from dino_hf.training.plan import TrainingPlan, head_only, run_mixed_precision

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture
def fresh_accelerate_state():
    yield
    reset_accelerate()


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def notes(fresh_head=True, samples_per_epoch=960, **settings) -> list[str]:
    args = DinoTrainingArguments(demo=True, **{"warmup_epochs": 1, **settings})  # 15 steps an epoch
    return TrainingPlan.from_args(args, samples_per_epoch, 1, fresh_head).notes()


# ---- a run shorter than its head warm-up, an lr warm-up as long as the run --------------------------


def test_a_run_within_its_head_warmup_is_said_head_only_before_and_after(
    data, tmp_path, capsys, monkeypatch, fresh_accelerate_state
):
    """configs/continue_pretraining.yaml's 1000-step head warm-up on a 4-step run: the plan line says the
    backbone trains 0 of 4 steps and how to change it, the run goes on (a head-only run stays possible),
    and the end names a head-only teacher. The same run is on the CPU with `--mixed_precision bf16` on a
    CPU without bf16 instructions, and writes to a pipe: the plan line says fp32, the progress is plain lines."""
    monkeypatch.setattr(plan_module, "cpu_has_bf16", lambda: False)
    argv = pretrain_arguments(
        data, tmp_path / "out", "--head_warmup_steps", "1000", "--mixed_precision", "bf16", num_train_epochs=1
    )
    assert pretrain_main()(argv) == 0
    captured = capsys.readouterr()
    plan_line = next(line for line in captured.out.splitlines() if line.startswith("plan: "))
    assert "the backbone trains 0 of 4 steps (--head_warmup_steps 1000 covers the whole run)" in plan_line
    assert "set --head_warmup_steps below 4" in plan_line
    assert "mixed precision bf16 asked but there is no GPU: the run computes in fp32" in plan_line
    assert "The head-only teacher backbone is in" in captured.out
    assert "The trained teacher backbone" not in captured.out
    assert "DINO: 4/4 steps (100%)" in captured.err and "\r" not in captured.err


def test_a_run_past_its_head_warmup_is_a_trained_teacher(data, tmp_path, capsys, fresh_accelerate_state):
    argv = pretrain_arguments(data, tmp_path / "out", "--head_warmup_steps", "2", num_train_epochs=1)
    assert pretrain_main()(argv) == 0
    out = capsys.readouterr().out
    assert "the backbone trains 2 of 4 steps, after 2 of the head alone" in out
    assert "The trained teacher backbone is in" in out


def test_head_only_is_claimed_only_for_a_fresh_head(tmp_path):
    (tmp_path / "dino.pth").write_bytes(b"")  # a reference file may bring its head: not claimed
    trained = dict(model_name_or_path="some/model", head_warmup_steps=10, demo=True)
    assert head_only(DinoTrainingArguments(**trained), 10)
    assert not head_only(DinoTrainingArguments(**trained), 11)
    assert not head_only(DinoTrainingArguments(**{**trained, "model_name_or_path": "vit_tiny_patch8"}), 5)
    assert not head_only(DinoTrainingArguments(**{**trained, "model_name_or_path": str(tmp_path / "dino.pth")}), 5)


def test_the_lr_warmup_covering_the_run_is_named():
    """configs/small_data_vit.yaml with --max_steps 60: 30 steps an epoch, 2 epochs of warm-up = 59 of 60."""
    args = parse_training_args(["--config", str(REPO / "configs" / "small_data_vit.yaml"), "--max_steps", "60"])
    said = TrainingPlan.from_args(args, 960, 1, fresh_head=False).notes()
    assert any("the lr warm-up (--warmup_epochs 2: 59 steps) covers the whole run of 60 steps" in n for n in said)
    assert any("set --warmup_epochs 0.2" in n for n in said)
    full = parse_training_args(["--config", str(REPO / "configs" / "small_data_vit.yaml")])
    assert TrainingPlan.from_args(full, 960, 1, fresh_head=False).notes() == []


def test_a_head_warmup_without_a_fresh_head_is_named():
    said = notes(fresh_head=False, model_name_or_path="vit_tiny_patch8", head_warmup_steps=5, max_steps=100)
    assert said == [
        "--head_warmup_steps 5 has no effect: vit_tiny_patch8 starts from random weights, the head with it"
    ]


# ---- mixed precision without a GPU ----------------------------------------------------------------


@pytest.mark.parametrize(
    "asked, env, bf16_cpu, runs",
    [
        ("bf16", None, False, "no"),  # emulated bf16: several times slower (benchmarks/cpu_mixed_precision.py)
        ("bf16", None, True, "bf16"),  # AVX512-BF16 / AMX: faster than fp32
        ("fp16", None, True, "no"),  # Accelerate has no fp16 autocast on the CPU
        (None, "bf16", False, "no"),  # `accelerate launch --mixed_precision bf16`
        (None, None, False, None),  # Accelerate's own setting
        ("no", None, False, "no"),
    ],
)
def test_the_precision_without_a_gpu(monkeypatch, asked, env, bf16_cpu, runs):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(plan_module, "cpu_has_bf16", lambda: bf16_cpu)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if env:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    args = DinoTrainingArguments(demo=True, mixed_precision=asked)
    assert run_mixed_precision(args) == runs
    note = plan_module.precision_note(args)
    assert (note is not None) == (runs == "no" and (asked or env) not in (None, "no"))


def test_the_precision_with_a_gpu_is_the_one_asked(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    for asked in ("bf16", "fp16", "no", None):
        assert run_mixed_precision(DinoTrainingArguments(demo=True, mixed_precision=asked)) == asked


# ---- abbreviated and unknown flags ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, closest",
    [("--num_train_epoch", "--num_train_epochs"), ("--conf", "--config"), ("--lerning_rate", "--learning_rate")],
)
def test_pretrain_refuses_an_abbreviated_or_mistyped_flag(tmp_path, capsys, flag, closest):
    argv = [*cli_arguments(TINY), "--demo", "--output_dir", str(tmp_path / "out"), flag, "3"]
    assert pretrain_main()(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pretrain.py: error: unrecognized arguments: {flag} 3; unknown flags: {flag} (did you mean")
    assert f"(did you mean {closest}?)" in err and "usage:" not in err
    assert not (tmp_path / "out").exists()


def test_pretrain_says_a_wrong_value_on_its_first_line(tmp_path, capsys):
    argv = ["--demo", "--output_dir", str(tmp_path / "out"), "--learning_rate", "fast"]
    assert pretrain_main()(argv) == 2
    assert capsys.readouterr().err.startswith(
        "pretrain.py: error: argument --learning_rate/--learning-rate: invalid float value: 'fast'"
    )


@pytest.mark.parametrize(
    "script, argv, closest",
    [
        ("eval_knn", ["--model", "M", "--train_dir", "T", "--nb_kn", "5"], "--nb_knn"),
        ("eval_linear", ["--model", "M", "--epoch", "1"], "--epochs"),
        ("eval_dense", ["--model", "M", "--dem"], "--demo"),
        ("extract_features", ["--model", "M", "--output_dir", "O", "--patch_token"], "--patch_tokens"),
        ("visualize_attention", ["--mod", "M", "--image", "I", "--output_dir", "O"], "--model"),
        ("visualize_pca", ["--model", "M", "--image", "I", "--output_dir", "O"], "--images"),
        ("visualize_pca", ["--model", "M", "--images", "I", "--output_dir", "O", "--threshol", "1"], "--threshold"),
        ("convert_checkpoint", ["--from", "dino", "S", "--to", "dino", "D", "--stud"], "--student"),
    ],
)
def test_every_script_refuses_an_abbreviated_flag(capsys, script, argv, closest):
    module = load_script(script)
    with pytest.raises(SystemExit) as exit_info:
        (module.parse_args if hasattr(module, "parse_args") else module.main)(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    first_line = err.splitlines()[0]  # the program's name is pytest's here
    assert first_line.partition(": error: ")[2].startswith("unrecognized arguments:"), err
    assert f"(did you mean {closest}?)" in err, err


def test_the_closest_flag_of_a_fragment():
    assert closest_flag("--epochs", ["--num_train_epochs", "--warmup_epochs", "--seed"]) == "--warmup_epochs"
    assert closest_flag("--zzz", ["--seed"]) is None


# ---- the evaluation scripts: k-NN on a small train set, a CNN, the workers --------------------------


def test_eval_knn_drops_the_k_larger_than_the_train_set(labelled_images, data, capsys):
    """20 train images: the default k = 10, 20, 100, 200 keep 10 and 20, with a note."""
    metrics = load_script("eval_knn").main(
        [
            "--model",
            str(data / "model"),
            "--train_dir",
            str(labelled_images / "train"),
            "--eval_dir",
            str(labelled_images / "validation"),
            "--batch_size",
            "8",
            "--num_workers",
            "0",
        ]
    )
    assert set(metrics) == {"knn_top1@10", "knn_top5@10", "knn_top1@20", "knn_top5@20"}
    assert "k = 100, 200 left out: larger than the 20 train images" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cnn") / "resnet"
    save_for_hf(timm.create_model("resnet10t", num_classes=0), folder)
    return folder


def test_visualize_attention_on_a_cnn_exits_2_with_one_line(cnn, labelled_images, tmp_path):
    image = next((labelled_images / "train" / "red").iterdir())
    command = [
        sys.executable,
        str(REPO / "scripts" / "visualize_attention.py"),
        "--model",
        str(cnn),
        "--image",
        str(image),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    completed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines() == [
        "visualize_attention.py: error: attention maps need a ViT; this backbone has no attention over patches"
    ]


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 1), (4, 3), (64, 4)])
def test_the_evaluation_scripts_start_no_more_workers_than_cores(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert cli.default_num_workers() == workers
    assert load_script("eval_knn").parse_args(["--model", "M"]).num_workers == workers
    assert load_script("eval_linear").parse_args(["--model", "M"]).num_workers == workers


# ---- settings without effect ---------------------------------------------------------------------


def test_a_config_setting_without_effect_is_named_in_the_plan_line():
    """configs/small_data.yaml's former `warmup_teacher_temp: 0.04` said nothing: it is the default, and the
    default goes unused whenever a recipe sets --teacher_temp alone. Another value is someone's setting."""
    assert notes(teacher_temp=0.07, max_steps=100) == []
    said = notes(teacher_temp=0.07, warmup_teacher_temp=0.03, max_steps=100)
    assert said == [
        "warmup_teacher_temp 0.03 has no effect: the teacher temperature is 0.07 from the first step "
        "(warmup_teacher_temp_epochs 0 gives no warm-up step); set --warmup_teacher_temp_epochs for a warm-up, "
        "or leave warmup_teacher_temp out"
    ]


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--warmup_teacher_temp", "0.03"], "--warmup_teacher_temp=0.03 is not valid: a starting temperature needs"),
        (["--warmup_teacher_temp_epochs", "5"], "--warmup_teacher_temp_epochs=5.0 is not valid: a warm-up from"),
    ],
)
def test_a_command_line_setting_without_effect_is_refused(tmp_path, capsys, flags, says):
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--output_dir", str(tmp_path / "out"), *flags]
    assert pretrain_main()(argv) == 2
    assert capsys.readouterr().err.startswith(f"pretrain.py: error: {says}")


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_no_shipped_config_holds_a_setting_without_effect(config, tmp_path):
    """Each key of a shipped config passes the check that a flag on the command line must pass."""
    args = parse_training_args(["--config", str(config), "--train_dir", str(tmp_path)])
    refuse_settings_without_effect(args, set(yaml.safe_load(config.read_text())))
    # The continued-pretraining configs are meant for trained weights without a head (--model_name_or_path).
    plan = TrainingPlan.from_args(args, args.samples_per_epoch or 960, 1, fresh_head=True)
    assert [note for note in plan.notes() if "has no effect" in note] == []
    if "warmup_teacher_temp" in config.read_text():  # said only where it takes effect or equals teacher_temp
        assert args.warmup_teacher_temp_epochs > 0 or args.warmup_teacher_temp == args.teacher_temp


# ---- progress into a pipe -----------------------------------------------------------------------


def test_plain_progress_writes_whole_lines_at_the_logging_steps(capsys):
    progress = PlainProgress(total=10, initial=0, desc="DINO")
    for step in range(1, 11):
        progress.update(1)
        if step % 5 == 0:
            progress.set_postfix(loss="1.0")
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["DINO: 5/10 steps (50%)", "DINO: 10/10 steps (100%)"]
    assert lines[0].endswith(" left")
    assert PlainProgress(total=10, disable=True).set_postfix() is None and capsys.readouterr().err == ""


# ---- continued pretraining without an evaluation set ----------------------------------------------------


def test_a_run_from_trained_weights_without_an_evaluation_set_says_nothing_guards_it(data, tmp_path):
    unguarded = DinoTrainingArguments(train_dir=str(data / "images"), model_name_or_path=str(data / "model"))
    guarded = DinoTrainingArguments(
        train_dir=str(data / "images"), model_name_or_path=str(data / "model"), eval_train_dir=str(labelled(tmp_path))
    )
    from_scratch = DinoTrainingArguments(train_dir=str(data / "images"))

    def said(args) -> bool:
        notes = TrainingPlan.from_args(args, 960, 1, fresh_head=False).notes()
        return any(note.startswith("nothing guards the result") and "--eval_train_dir" in note for note in notes)

    assert said(unguarded) and not said(guarded) and not said(from_scratch)


def labelled(root: Path) -> Path:
    for split in ("train", "validation"):
        (root / "labelled" / split / "a").mkdir(parents=True)
    return root / "labelled"
