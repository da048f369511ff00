"""What a new user mistypes on the command line of scripts/pretrain.py: each case is refused with exit
status 2 and a message that says what was wrong and what would be accepted, before the networks are
built wherever it can be known then, without a traceback, and with nothing left in the output folder.

Every case runs twice: through the script's `main(argv)` in this process (fast, with the network
builder replaced by one that fails, so that a case refused "before the networks" is seen to be), and
(slow) through the real CLI in a subprocess, where the networks' line of the log must be absent.
"""

import shutil

import datasets
import pytest
from runs import TINY, cli_arguments, pretrain_main, reset_accelerate, run_cli, train_in_process

from dino_hf.training import trainer


@pytest.fixture(scope="module")
def workspace(data, trained_run, labelled_images, tmp_path_factory) -> dict:
    """The paths the cases name: the `data` fixture's images and model, a run and its checkpoint, and
    wrong inputs of every kind."""
    root = tmp_path_factory.mktemp("refusals")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not an image\n")
    (root / "typo.yaml").write_text("lerning_rate: 0.001\n")
    (root / "two_images").mkdir()
    for name in ("000.png", "001.png"):
        shutil.copy(data / "images" / name, root / "two_images" / name)
    (root / "weights.bin").write_bytes(b"not a checkpoint")
    text = datasets.Dataset.from_dict({"image": ["a.png", "b.png", "c.png", "d.png"], "label": [0, 1, 0, 1]})
    (root / "text_parquet").mkdir()
    text.to_parquet(str(root / "text_parquet" / "train-00000.parquet"))
    text.save_to_disk(str(root / "saved_dataset"))
    checkpoint = trained_run / "checkpoints" / "checkpoint-2"
    return {
        "images": str(data / "images"),
        "model": str(data / "model"),
        "run": str(trained_run),
        "checkpoint": str(checkpoint),
        "checkpoint_file": str(checkpoint / "teacher.safetensors"),
        "checkpoint_export": str(checkpoint / "teacher_backbone"),
        "export": str(trained_run / "teacher_backbone"),
        "classes": str(labelled_images / "train"),
        "labelled": str(labelled_images),
        **{name: str(root / name) for name in ("empty", "notes", "two_images", "typo.yaml", "weights.bin")},
        **{name: str(root / name) for name in ("text_parquet", "saved_dataset")},
    }


def default_data(w: dict) -> list[str]:
    return ["--train_dir", w["images"], "--model_name_or_path", w["model"]]


# id -> (the arguments beside TINY and --output_dir, what the message says, refused before the networks)
CASES = {
    "resume_at_an_export": (
        lambda w: [*default_data(w), "--resume_from_checkpoint", w["export"]],
        ["is an exported model folder", "It takes a checkpoint-<step> folder", "or 'latest'", "are checkpoint-2"],
        True,
    ),
    "resume_at_the_export_of_a_checkpoint": (
        lambda w: [*default_data(w), "--resume_from_checkpoint", w["checkpoint_export"]],
        ["is the exported teacher backbone of the checkpoint", "; pass the folder, --resume_from_checkpoint "],
        True,
    ),
    "resume_at_a_file_of_a_checkpoint": (
        lambda w: [*default_data(w), "--resume_from_checkpoint", w["checkpoint_file"]],
        ["is the file teacher.safetensors of the checkpoint", "; pass the folder, --resume_from_checkpoint "],
        True,
    ),
    "resume_at_another_file": (
        lambda w: [*default_data(w), "--resume_from_checkpoint", w["weights.bin"]],
        ["weights.bin' is not valid: it is a file. It takes a checkpoint-<step> folder", "there is no complete"],
        True,
    ),
    "resume_at_a_folder_that_is_no_checkpoint": (
        lambda w: [*default_data(w), "--resume_from_checkpoint", w["images"]],
        ["is not a checkpoint (it has no manifest.json", "there is no complete checkpoint under"],
        True,
    ),
    "resume_at_a_run_folder": (
        lambda w: [*default_data(w), "--resume_from_checkpoint", w["run"]],
        ["is the output folder of a run, not one of its checkpoints", "are checkpoint-2", "'latest' with"],
        True,
    ),
    "resume_at_a_missing_folder": (
        lambda w: [*default_data(w), "--resume_from_checkpoint", w["empty"] + "/checkpoint-9"],
        ["checkpoint-9' is not valid: it does not exist. It takes a checkpoint-<step> folder"],
        True,
    ),
    "init_at_an_export": (
        lambda w: ["--train_dir", w["images"], "--init_from_checkpoint", w["export"]],
        ["is an exported model folder", "pass it as --model_name_or_path", "are checkpoint-2"],
        True,
    ),
    "init_at_a_file_of_a_checkpoint": (
        lambda w: ["--train_dir", w["images"], "--init_from_checkpoint", w["checkpoint_file"]],
        ["is the file teacher.safetensors of the checkpoint", "; pass the folder, --init_from_checkpoint "],
        True,
    ),
    "init_at_a_folder_that_is_no_checkpoint": (
        lambda w: ["--train_dir", w["images"], "--init_from_checkpoint", w["notes"]],
        ["is not a checkpoint", "or a run's OUTPUT_DIR (its newest checkpoint is taken)"],
        True,
    ),
    "init_with_other_head_settings": (
        lambda w: ["--train_dir", w["images"], "--init_from_checkpoint", w["checkpoint"], "--out_dim", "128"],
        ["was trained with other networks than this run asks for: --out_dim 64 there, 128 here"],
        True,
    ),
    "model_at_a_file_of_a_checkpoint": (
        lambda w: ["--train_dir", w["images"], "--model_name_or_path", w["checkpoint_file"]],
        ["is the file teacher.safetensors of the training checkpoint", "--init_from_checkpoint ", "teacher_backbone"],
        True,
    ),
    "model_at_a_checkpoint": (
        lambda w: ["--train_dir", w["images"], "--model_name_or_path", w["checkpoint"]],
        ["this is a training checkpoint: start from all of it", "--init_from_checkpoint "],
        True,
    ),
    "model_at_a_file_of_the_wrong_kind": (
        lambda w: ["--train_dir", w["images"], "--model_name_or_path", w["weights.bin"]],
        ["a reference DINO checkpoint file ending in .pth, .pt or .safetensors"],
        True,
    ),
    "dataset_of_text_not_images": (
        lambda w: ["--dataset_name", w["text_parquet"], "--model_name_or_path", w["model"]],
        ["the image column found is 'image', which holds no images: its first values are 'a.png' (missing_file)"],
        False,
    ),
    "data_files_of_text_not_images": (
        lambda w: ["--data_files", w["text_parquet"] + "/*.parquet", "--model_name_or_path", w["model"]],
        ["the image column found is 'image', which holds no images", "pass the one that holds images"],
        False,
    ),
    "dataset_saved_with_save_to_disk": (
        lambda w: ["--dataset_name", w["saved_dataset"], "--model_name_or_path", w["model"]],
        ["written by save_to_disk: pass its arrow files as --data_files", "saved_dataset/*.arrow"],
        True,
    ),
    "image_column_of_numbers": (
        lambda w: [
            "--dataset_name",
            w["text_parquet"],
            "--model_name_or_path",
            w["model"],
            "--image_column_name",
            "label",
        ],
        ["--image_column_name names 'label', which holds int64 values, not images; the columns are"],
        False,
    ),
    "image_column_of_class_labels": (
        lambda w: ["--train_dir", w["classes"], "--model_name_or_path", w["model"], "--image_column_name", "label"],
        ["'label', which holds class labels, not images; the columns with the Image feature are ['image']"],
        False,
    ),
    "image_column_that_does_not_exist": (
        lambda w: [*default_data(w), "--image_column_name", "picture"],
        ["image column 'picture' not found; the columns are ['image']"],
        False,
    ),
    "local_crops_the_patch_does_not_divide": (
        lambda w: [*default_data(w), "--local_crops_size", "12"],
        ["--local_crops_size=12 is not valid: a multiple of the backbone's patch size 8, e.g. 8 or 16"],
        True,
    ),
    "global_crops_the_patch_does_not_divide": (
        lambda w: [*default_data(w), "--global_crops_size", "36"],
        ["--global_crops_size=36 is not valid: a multiple of the backbone's patch size 8, e.g. 32 or 40"],
        True,
    ),
    "knn_guard_without_evaluations": (
        lambda w: [*default_data(w), "--stop_if_knn_drops", "5"],
        ["--stop_if_knn_drops=5.0 is not valid", "set together with --eval_steps N and an evaluation set"],
        True,
    ),
    "train_dir_without_images": (
        lambda w: ["--train_dir", w["empty"], "--model_name_or_path", w["model"]],
        ["no image, parquet, arrow or .tar files found"],
        False,
    ),
    "train_dir_of_text_files": (
        lambda w: ["--train_dir", w["notes"], "--model_name_or_path", w["model"]],
        ["no image, parquet, arrow or .tar files found"],
        False,
    ),
    # The k-NN of step 0 has exported the start as teacher_backbone_best when the first batch fails.
    "fewer_images_than_a_batch": (
        lambda w: [
            "--train_dir",
            w["two_images"],
            "--model_name_or_path",
            w["model"],
            "--eval_train_dir",
            w["labelled"],
        ],
        ["the training stream gave no complete batch; use a smaller batch or more data"],
        False,
    ),
    "misspelt_key_in_a_config_file": (
        lambda w: [*default_data(w), "--config", w["typo.yaml"]],
        ["typo.yaml: unknown field(s) lerning_rate"],
        True,
    ),
}


def arguments(case: str, workspace: dict, output_dir) -> list[str]:
    extra, _, _ = CASES[case]
    return [*cli_arguments(TINY), "--output_dir", str(output_dir), *extra(workspace)]


@pytest.fixture
def fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_process(case, workspace, tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    _, says, before_models = CASES[case]
    if before_models:
        monkeypatch.setattr(trainer, "build_student_teacher", _not_to_be_built)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's own\n")  # a folder that was there stays as it was
    status = pretrain_main()(arguments(case, workspace, tmp_path / "out"))
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    for fragment in says:
        assert fragment in stderr, stderr
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["notes.txt"]


def _not_to_be_built(args):
    raise AssertionError("the networks were built before the refusal")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_refused_through_the_cli(case, workspace, tmp_path):
    _, says, before_models = CASES[case]
    completed = run_cli(*arguments(case, workspace, tmp_path / "out"))
    assert completed.returncode == 2, completed.stderr[-3000:]
    for fragment in says:
        assert fragment in completed.stderr, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    if before_models:
        assert "networks: " not in completed.stdout
    assert not (tmp_path / "out").exists()


def test_resume_latest_without_a_checkpoint_starts_from_step_0(data, tmp_path, capsys, fresh_accelerate_state):
    out = tmp_path / "out"
    result = train_in_process(
        train_dir=str(data / "images"),
        model_name_or_path=str(data / "model"),
        output_dir=str(out),
        resume_from_checkpoint="latest",
        max_train_steps=1,
    )
    assert f"no checkpoint to resume from in {out / 'checkpoints'}: starting from step 0" in capsys.readouterr().out
    assert result.global_step == 1 and (out / "checkpoints" / "checkpoint-1" / "manifest.json").is_file()
