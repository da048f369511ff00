"""`--init_from_checkpoint`: a new run from the student, teacher, heads and center of a training
checkpoint, with its own schedule (step 0), a fresh optimiser, new data and a new output folder.

The first step of a run has learning rate 0 (the warm-up's start); with `--momentum_teacher 1` and
`--center_momentum 1` it leaves the teacher and the center as they are too, so the checkpoint of that
step holds exactly what the run started from.
"""

import json
import shutil

import pytest
import torch
from runs import TINY, cli_arguments, run_cli, saved, train_in_process, trainer_state
from safetensors.torch import load_file, save_file

from dino_hf.run_files.init_checkpoint import ARCHITECTURE_FIELDS
from dino_hf.training.arguments import DinoTrainingArguments

# The run's settings without the model and head ones: those come from the checkpoint.
DATA_AND_SCHEDULE = {name: value for name, value in TINY.items() if name not in ARCHITECTURE_FIELDS}
STILL = dict(max_train_steps=1, momentum_teacher=1.0, center_momentum=1.0)


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_a_run_starts_from_the_networks_of_the_checkpoint(data, trained_run, tmp_path):
    source = trained_run / "checkpoints" / "checkpoint-2"
    out = tmp_path / "out"
    options = dict(train_dir=str(data / "images"), init_from_checkpoint=str(trained_run), output_dir=str(out))
    result = train_in_process(**DATA_AND_SCHEDULE, **options, **STILL)
    assert result.global_step == 1 and result.start == "starting"
    first = out / "checkpoints" / "checkpoint-1"
    for part in ("student", "teacher", "dino_loss"):  # the run folder stood for its newest checkpoint
        assert_same(saved(first, part), saved(source, part))
    assert trainer_state(first)["global_step"] == 1  # a new schedule: step 0, then 1
    optimizer = torch.load(first / "optimizer.pt", weights_only=True)
    assert {int(entry["step"]) for entry in optimizer["state"].values()} == {1}  # a fresh optimiser
    settings = json.loads((first / "training_args.json").read_text())
    assert (settings["model_name_or_path"], settings["out_dim"], settings["head_hidden_dim"]) == (
        str(data / "model"),
        64,
        32,
    )


def test_settings_that_shape_other_networks_are_refused(data, trained_run, tmp_path):
    with pytest.raises(ValueError) as refused:
        DinoTrainingArguments(
            train_dir=str(data / "images"),
            init_from_checkpoint=str(trained_run),
            output_dir=str(tmp_path / "out"),
            out_dim=128,
            head_nlayers=2,
        )
    message = str(refused.value)
    assert "--out_dim 64 there, 128 here" in message and "--head_nlayers 3 there, 2 here" in message
    assert "Leave these settings out (the checkpoint's are taken)" in message


def test_the_checkpoint_of_the_run_itself_is_refused(data, trained_run):
    with pytest.raises(ValueError, match="is in this run's --output_dir"):
        DinoTrainingArguments(
            train_dir=str(data / "images"), init_from_checkpoint=str(trained_run), output_dir=str(trained_run)
        )


def rewrite_manifest(folder) -> None:
    """The manifest of a checkpoint whose files were changed in place (the sizes it lists)."""
    manifest = folder / "manifest.json"
    sizes = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({name: (folder / name).stat().st_size for name in sizes}))


def test_loading_is_strict_and_names_what_does_not_fit(data, trained_run, tmp_path):
    folder = tmp_path / "start" / "checkpoint-2"
    shutil.copytree(trained_run / "checkpoints" / "checkpoint-2", folder)
    teacher = load_file(folder / "teacher.safetensors")
    teacher["backbone.model.spare"] = teacher.pop("backbone.model.layernorm.bias")
    save_file(teacher, folder / "teacher.safetensors")
    rewrite_manifest(folder)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as refused:
        train_in_process(
            **DATA_AND_SCHEDULE, train_dir=str(data / "images"), init_from_checkpoint=str(folder), output_dir=str(out)
        )
    message = str(refused.value)
    expected = len(teacher)
    assert f"teacher: 1 of its {expected} tensors are not in the checkpoint (backbone.model.layernorm.bias)" in message
    assert f"1 of the checkpoint's {expected} are not in it (backbone.model.spare)" in message
    assert "student" not in message.split("does not fit")[1]  # the student, head and center fitted
    assert not out.exists()  # a refused run leaves nothing


@pytest.mark.slow
def test_init_through_the_cli_and_a_resume_of_that_run(data, trained_run, tmp_path):
    out = tmp_path / "out"
    run = {**DATA_AND_SCHEDULE, "train_dir": str(data / "images"), "init_from_checkpoint": str(trained_run)}
    argv = cli_arguments({**run, "output_dir": str(out), "momentum_teacher": 1.0, "center_momentum": 1.0})
    completed = run_cli(*argv, "--max_train_steps", "1")
    assert completed.returncode == 0, completed.stderr[-3000:]
    source = trained_run / "checkpoints" / "checkpoint-2"
    assert (
        f"starting from {source} (the newest of {trained_run}): its student, teacher, heads and center; step 0, "
        "a fresh optimiser" in completed.stdout.splitlines()
    )
    assert "has trained weights but no DINO head" not in completed.stderr  # the head came with the checkpoint
    for part in ("student", "teacher", "dino_loss"):
        assert_same(saved(out / "checkpoints" / "checkpoint-1", part), saved(source, part))

    resumed = run_cli(*argv, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-1'} at step 1" in resumed.stdout
    assert trainer_state(out / "checkpoints" / "checkpoint-2")["global_step"] == 2
