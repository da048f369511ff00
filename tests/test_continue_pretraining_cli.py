"""Continued pretraining through the real CLI: transformers and timm checkpoints train from every one
of their weights, come back as their own class, and damaged or non-vision checkpoints are refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow

SCRIPT = str(Path(__file__).resolve().parent.parent / "scripts" / "pretrain.py")
TINY = [
    "--global_crops_size", "32",
    "--local_crops_size", "16",
    "--local_crops_number", "2",
    "--out_dim", "64",
    "--head_hidden_dim", "32",
    "--head_bottleneck_dim", "16",
    "--per_device_train_batch_size", "4",
    "--dataloader_num_workers", "0",
    "--samples_per_epoch", "8",
    "--shuffle_buffer_size", "8",
    "--num_train_epochs", "2",
    "--checkpointing_steps", "100",
    "--logging_steps", "1",
]  # fmt: skip
VIT_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


def pretrain(data: Path, model: Path | str, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, SCRIPT, *TINY, "--train_dir", str(data / "images"), "--model_name_or_path", str(model)]
    return subprocess.run(
        [*command, "--output_dir", str(output_dir), *extra], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dinov2") / "model"
    torch.manual_seed(0)
    tf.Dinov2Model(tf.Dinov2Config(**VIT_SIZES, mlp_ratio=2)).save_pretrained(folder)
    return folder


def test_a_frozen_backbone_run_gives_back_the_input_as_its_own_class(data, dinov2, tmp_path):
    """With the backbone frozen the whole run (only the fresh head trains), the export is the checkpoint
    it started from, as a Dinov2Model folder that stock transformers loads in a fresh process."""
    completed = pretrain(data, dinov2, tmp_path / "out", "--head_warmup_steps", "1000")
    assert completed.returncode == 0, completed.stderr
    export = tmp_path / "out" / "teacher_backbone"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["Dinov2Model"]
    exported, original = load_file(export / "model.safetensors"), load_file(dinov2 / "model.safetensors")
    assert exported.keys() == original.keys()
    for key, tensor in original.items():  # the teacher's EMA of an unchanged student rounds by at most an ulp
        torch.testing.assert_close(exported[key], tensor, rtol=1e-6, atol=1e-7, msg=key)
    card = (export / "README.md").read_text()
    assert str(dinov2) in card  # the model card names the checkpoint it started from
    script = (
        "import sys\n"
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(export)!r})\n"
        "assert type(model).__name__ == 'Dinov2Model', type(model)\n"
        "assert 'dino_hf' not in sys.modules\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr


def test_a_dinov3_run_trains_every_weight_of_its_checkpoint(data, tmp_path):
    folder = tmp_path / "dinov3"
    torch.manual_seed(0)
    tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**VIT_SIZES, intermediate_size=64, num_register_tokens=2)).save_pretrained(
        folder
    )
    completed = pretrain(data, folder, tmp_path / "out", "--learning_rate", "0.01", "--warmup_epochs", "0")
    assert completed.returncode == 0, completed.stderr
    export = tmp_path / "out" / "teacher_backbone"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["DINOv3ViTModel"]
    exported, original = load_file(export / "model.safetensors"), load_file(folder / "model.safetensors")
    assert exported.keys() == original.keys()
    moved = [key for key in original if not torch.equal(exported[key], original[key])]
    assert set(original) - set(moved) == {"embeddings.mask_token"}  # only the mask token, which DINO does not use


@pytest.mark.parametrize("builder", ["convnext", "timm_vit"])
def test_cnn_and_timm_vit_folders_take_the_local_crops(data, tmp_path, builder):
    folder = tmp_path / builder
    torch.manual_seed(0)
    if builder == "convnext":
        tf.ConvNextModel(tf.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])).save_pretrained(folder)
        extra = ["--local_crops_size", "32"]
    else:
        model = timm.create_model(
            "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
        )
        timm.models.save_for_hf(model, folder, safe_serialization=True)
        extra = []
    completed = pretrain(data, folder, tmp_path / "out", *extra)
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "out" / "teacher_backbone" / "model.safetensors").is_file()


def _refused(completed: subprocess.CompletedProcess, output_dir: Path, *phrases: str) -> None:
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    for phrase in phrases:
        assert phrase in completed.stderr
    assert not output_dir.exists() or not any(output_dir.rglob("*"))


def test_a_damaged_checkpoint_is_refused_before_any_step(data, dinov2, tmp_path):
    folder = tmp_path / "damaged"
    tf.Dinov2Model.from_pretrained(dinov2).save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["encoder.layer.1.norm2.weight"]
    tensors["embeddings.cls"] = tensors.pop("embeddings.cls_token")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    completed = pretrain(data, folder, tmp_path / "out")
    _refused(
        completed,
        tmp_path / "out",
        "2 tensor(s) missing from the checkpoint",
        "embeddings.cls_token",
        "1 tensor(s) in the checkpoint but not in the model: embeddings.cls",
    )


def test_a_text_model_is_refused_before_the_models_are_built(data, tmp_path):
    folder = tmp_path / "bert"
    tf.BertModel(
        tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    ).save_pretrained(folder)
    completed = pretrain(data, folder, tmp_path / "out")
    _refused(completed, tmp_path / "out", "is a 'bert' model, not a vision backbone", "dinov2")
