"""Tests of dino_hf/convert.py, export.py, timm_weights.py and weight_files.py: parity with transformers'
ViTModel and timm's VisionTransformer, exports that load without dino_hf, the reference checkpoint
format, safe loading and the error messages."""

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, TimmWrapperModel, ViTConfig, ViTModel

from dino_hf import DinoConfig, DinoModel
from dino_hf.convert.conversions import (
    convert_checkpoint,
    dino_from_reference,
    dino_from_timm,
    dino_from_vit,
    load_dino_folder,
)
from dino_hf.convert.export import save_as_timm, save_as_vit, to_timm_model, to_vit_model
from dino_hf.convert.timm_weights import dino_to_timm_state_dict, timm_to_dino_state_dict
from dino_hf.models.heads import DinoHead
from dino_hf.models.weight_files import load_checkpoint_file

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with noise (biases and norms included, so that a swapped q / k / v bias or a
    dropped LayerNorm shows) and put the module in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module.eval()


def tiny_dino(seed: int = 0, **overrides) -> DinoModel:
    return randomize_(DinoModel(DinoConfig(**{**TINY, "drop_path_rate": 0.0, **overrides})), seed)


def tiny_vit(seed: int = 0, layer_norm_eps: float = 1e-6) -> ViTModel:
    return randomize_(ViTModel(ViTConfig(**TINY, layer_norm_eps=layer_norm_eps)), seed)


def tiny_timm(seed: int = 0) -> torch.nn.Module:
    model = timm.create_model(
        "vit_small_patch16_224", num_classes=0, embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32
    )
    return randomize_(model, seed)


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # (B, 3, H, W)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --- names ------------------------------------------------------------------------------------------


def test_timm_names_match_timm_and_round_trip():
    model = tiny_dino()
    timm_state = dino_to_timm_state_dict(model.state_dict())
    assert timm_state.keys() == tiny_timm().state_dict().keys()
    layer = "encoder.layer.1.attention.attention"
    qkv_weight, qkv_bias = timm_state["blocks.1.attn.qkv.weight"], timm_state["blocks.1.attn.qkv.bias"]
    assert qkv_weight.shape == (96, 32)
    for index, part in enumerate(("query", "key", "value")):  # q, k, v in that order along dim 0
        assert torch.equal(qkv_weight[32 * index : 32 * (index + 1)], model.state_dict()[f"{layer}.{part}.weight"])
        assert torch.equal(qkv_bias[32 * index : 32 * (index + 1)], model.state_dict()[f"{layer}.{part}.bias"])
    back = timm_to_dino_state_dict(timm_state)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[key], value) for key, value in model.state_dict().items())


# --- import -----------------------------------------------------------------------------------------


def test_vit_model_parity():
    vit = tiny_vit()
    model = dino_from_vit(vit)
    with torch.no_grad():
        expected, got = vit(images()), model(images())
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) <= TOLERANCE
    # ViTModel's own pooler is a dense + tanh; the DINO feature is the normalised CLS token.
    assert max_diff(got.pooler_output, expected.last_hidden_state[:, 0]) <= TOLERANCE
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.patch_size) == (32, 2, 8)


def test_vit_folder_uses_dino_eps_and_accepts_prefixed_state_dict(tmp_path):
    vit = tiny_vit(layer_norm_eps=1e-12)  # what the facebook/dino-* configs say
    vit.save_pretrained(tmp_path)
    model = dino_from_vit(tmp_path)
    assert model.config.layer_norm_eps == 1e-6
    assert model.config.image_size == 32
    on_disk = load_file(tmp_path / "model.safetensors")
    assert any(key.startswith("pooler.") for key in on_disk)
    prefixed = {f"vit.{key}": tensor for key, tensor in on_disk.items()}
    assert_same_weights(dino_from_vit(prefixed, num_attention_heads=2), model)
    assert_same_weights(dino_from_vit(tmp_path / "model.safetensors", num_attention_heads=2), model)


def test_timm_model_parity(tmp_path):
    source = tiny_timm()
    model = dino_from_timm(source)
    with torch.no_grad():
        got = model(images())
        assert max_diff(got.last_hidden_state, source.forward_features(images())) <= TOLERANCE
        assert max_diff(got.pooler_output, source(images())) <= TOLERANCE
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    assert_same_weights(dino_from_timm(tmp_path / "timm.pth", num_attention_heads=2), model)


def reference_checkpoint(path: Path) -> dict:
    """A training checkpoint in the reference's format, with distinct teacher and student."""
    networks = {}
    for name, seed in (("teacher", 10), ("student", 20)):
        backbone = dino_to_timm_state_dict(tiny_dino(seed).state_dict())
        head = randomize_(DinoHead(in_dim=32, out_dim=64, hidden_dim=48, bottleneck_dim=16), seed + 1).state_dict()
        networks[name] = (tiny_dino(seed), head, backbone)
    teacher, student = networks["teacher"], networks["student"]
    checkpoint = {
        "student": {f"module.backbone.{k}": v for k, v in student[2].items()}
        | {f"module.head.{k}": v for k, v in student[1].items()},
        "teacher": {f"backbone.{k}": v for k, v in teacher[2].items()}
        | {f"head.{k}": v for k, v in teacher[1].items()},
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "epoch": 7,
        "args": argparse.Namespace(arch="vit_small", patch_size=8, norm_last_layer=False, out_dim=64),
        "dino_loss": {"center": torch.zeros(1, 64)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0},
    }
    torch.save(checkpoint, path)
    return networks


def test_reference_checkpoint_teacher_student_and_head(tmp_path):
    networks = reference_checkpoint(tmp_path / "checkpoint.pth")
    for use_student, name in ((False, "teacher"), (True, "student")):
        imported = dino_from_reference(tmp_path / "checkpoint.pth", use_student=use_student, num_attention_heads=2)
        expected_model, expected_head, _ = networks[name]
        assert_same_weights(imported.model, expected_model)
        with torch.no_grad():
            assert torch.equal(imported.model(images()).pooler_output, expected_model(images()).pooler_output)
        assert imported.head_state_dict.keys() == expected_head.keys()
        assert all(torch.equal(imported.head_state_dict[k], v) for k, v in expected_head.items())
        config = imported.head_config
        assert (config["in_dim"], config["out_dim"], config["hidden_dim"], config["bottleneck_dim"]) == (
            32,
            64,
            48,
            16,
        )
        assert (config["nlayers"], config["use_bn"]) == (3, False)
        assert config["norm_last_layer"] is (not use_student)  # teacher always True; student from args
        head = DinoHead(**config).eval()
        head.load_state_dict(imported.head_state_dict)
        features = torch.randn(2, 32)
        reference_head = DinoHead(in_dim=32, out_dim=64, hidden_dim=48, bottleneck_dim=16).eval()
        reference_head.load_state_dict(expected_head)
        assert torch.equal(head(features), reference_head(features))
    teacher, student = networks["teacher"][0], networks["student"][0]
    assert not torch.equal(teacher.state_dict()["layernorm.weight"], student.state_dict()["layernorm.weight"])


def test_backbone_only_state_dict_infers_heads(tmp_path):
    model = tiny_dino(seed=3, hidden_size=128, num_hidden_layers=1, intermediate_size=512)
    torch.save(dino_to_timm_state_dict(model.state_dict()), tmp_path / "backbone.pth")
    imported = dino_from_reference(tmp_path / "backbone.pth")
    assert imported.head_state_dict is None
    assert imported.model.config.num_attention_heads == 2  # 128 // 64
    assert_same_weights(imported.model, model)
    with pytest.raises(ValueError, match="use_student"):
        dino_from_reference(tmp_path / "backbone.pth", use_student=True)


class _RunsCode:
    """An object whose unpickling would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"teacher": _RunsCode(marker), "epoch": 1}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="does not unpickle"):
        load_checkpoint_file(tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="does not unpickle"):
        dino_from_reference(tmp_path / "evil.pth")
    assert not marker.exists()


def test_errors_name_the_key_or_the_sizes(tmp_path):
    state = dino_to_timm_state_dict(tiny_dino().state_dict())
    with pytest.raises(ValueError, match=r"head\.weight"):
        dino_from_timm(state | {"head.weight": torch.zeros(10, 32)}, num_attention_heads=2)
    with pytest.raises(ValueError, match=r"'norm\.weight'"):
        dino_from_timm({k: v for k, v in state.items() if k != "norm.weight"}, num_attention_heads=2)
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.fc1\.bias'.*\(100,\).*\(128,\)"):
        dino_from_timm(state | {"blocks.1.mlp.fc1.bias": torch.zeros(100)}, num_attention_heads=2)
    with pytest.raises(ValueError, match=r"image size 30 is not a multiple of patch size 8"):
        dino_from_timm(state, num_attention_heads=2, image_size=30)
    with pytest.raises(ValueError, match=r"image size 40 / patch 8 gives 25 positions.*hold 16.*image size 32"):
        dino_from_timm(state, num_attention_heads=2, image_size=40)
    with pytest.raises(ValueError, match="num_attention_heads"):
        dino_from_timm(state)
    vit_state = tiny_dino().state_dict() | {"classifier.weight": torch.zeros(10, 32)}
    with pytest.raises(ValueError, match=r"classifier\.weight"):
        dino_from_vit(vit_state, num_attention_heads=2)
    save_as_timm(tiny_dino(), tmp_path / "timm")
    with pytest.raises(ValueError, match="model_type"):
        dino_from_vit(tmp_path / "timm")


# --- export -----------------------------------------------------------------------------------------


def test_save_as_vit_loads_with_automodel_and_round_trips(tmp_path):
    model = tiny_dino()
    save_as_vit(model, tmp_path)
    vit = AutoModel.from_pretrained(tmp_path).eval()
    assert type(vit) is ViTModel and vit.config.model_type == "vit"
    with torch.no_grad():
        expected, got = model(images()), vit(images())
    assert max_diff(got.pooler_output, expected.pooler_output) <= TOLERANCE
    assert max_diff(got.last_hidden_state, expected.last_hidden_state) <= TOLERANCE
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert (processor.crop_size.height, processor.crop_size.width) == (32, 32)
    assert tuple(processor.image_mean) == (0.485, 0.456, 0.406)
    assert_same_weights(dino_from_vit(tmp_path), model)
    with torch.no_grad():
        assert max_diff(to_vit_model(model)(images()).pooler_output, expected.pooler_output) <= TOLERANCE


@pytest.mark.slow
def test_save_as_vit_loads_where_dino_hf_cannot_be_imported(tmp_path):
    model = tiny_dino()
    save_as_vit(model, tmp_path / "vit")
    torch.save(images(), tmp_path / "images.pt")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["dino_hf"] = None  # any import of dino_hf now fails, installed or not
        try:
            import dino_hf
        except ImportError:
            pass
        else:
            raise SystemExit("dino_hf is importable")
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained("vit").eval()
        with torch.no_grad():
            out = model(torch.load("images.pt", weights_only=True))
        torch.save({"pooler": out.pooler_output, "last": out.last_hidden_state, "cls": type(model).__name__}, "out.pt")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, check=True)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        expected = model(images())
    assert out["cls"] == "ViTModel"
    assert max_diff(out["pooler"], expected.pooler_output) <= TOLERANCE
    assert max_diff(out["last"], expected.last_hidden_state) <= TOLERANCE


def test_save_as_timm_loads_in_timm_and_transformers(tmp_path):
    model = tiny_dino()
    save_as_timm(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] and config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert "num_classes" not in config["model_args"]  # timm's save_for_hf puts it there: TimmWrapperModel fails
    with torch.no_grad():
        expected = model(images())
        timm_model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
        assert max_diff(timm_model(images()), expected.pooler_output) <= TOLERANCE
        assert max_diff(timm_model.forward_features(images()), expected.last_hidden_state) <= TOLERANCE
        for wrapper in (TimmWrapperModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
            assert type(wrapper) is TimmWrapperModel
            got = wrapper.eval()(images())
            assert max_diff(got.pooler_output, expected.pooler_output) <= TOLERANCE
            assert max_diff(got.last_hidden_state, expected.last_hidden_state) <= TOLERANCE
        assert max_diff(to_timm_model(model)(images()), expected.pooler_output) <= TOLERANCE
    assert_same_weights(dino_from_timm(tmp_path), model)


def test_convert_checkpoint_keeps_the_head(tmp_path):
    networks = reference_checkpoint(tmp_path / "checkpoint.pth")
    convert_checkpoint("dino", tmp_path / "checkpoint.pth", "dino", tmp_path / "out", num_attention_heads=2)
    assert {"config.json", "model.safetensors", "dino_head.safetensors", "dino_head_config.json"} <= {
        path.name for path in (tmp_path / "out").iterdir()
    }
    imported = load_dino_folder(tmp_path / "out")
    assert_same_weights(imported.model, networks["teacher"][0])
    assert all(torch.equal(imported.head_state_dict[k], v) for k, v in networks["teacher"][1].items())
    assert imported.head_config["norm_last_layer"] is True
    with pytest.raises(ValueError, match="unknown target format"):
        convert_checkpoint("dino", tmp_path / "checkpoint.pth", "onnx", tmp_path / "bad")


@pytest.mark.slow
def test_script_converts_vit_to_dino_to_timm(tmp_path):
    vit = tiny_vit()
    vit.save_pretrained(tmp_path / "vit")
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    script = str(REPO_ROOT / "scripts" / "convert_checkpoint.py")
    for args in (["--from", "vit", "vit", "--to", "dino", "dino"], ["--from", "dino", "dino", "--to", "timm", "timm"]):
        done = subprocess.run([sys.executable, script, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "wrote" in done.stdout
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        assert max_diff(timm_model.forward_features(images()), vit(images()).last_hidden_state) <= TOLERANCE
