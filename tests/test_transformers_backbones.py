"""Backbones from transformers and timm checkpoints: every family builds, every weight is loaded or the
checkpoint is refused, crop sizes are checked, and the export is the input's own class."""

import json
import subprocess
import sys

import pytest
import timm
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from dino_hf.convert.conversions import dino_from_vit
from dino_hf.convert.export import export_backbone
from dino_hf.models.backbones import TimmBackbone, TransformersBackbone, build_backbone
from dino_hf.models.weight_check import WeightLoadingError, on_disk_state_dict

VIT_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
STAGES = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
CONFIGS = {
    "vit": lambda: tf.ViTConfig(**VIT_SIZES, intermediate_size=64),
    "deit": lambda: tf.DeiTConfig(**VIT_SIZES, intermediate_size=64),
    "dinov2": lambda: tf.Dinov2Config(**VIT_SIZES, mlp_ratio=2),
    "dinov2_with_registers": lambda: tf.Dinov2WithRegistersConfig(**VIT_SIZES, mlp_ratio=2, num_register_tokens=2),
    "dinov3_vit": lambda: tf.DINOv3ViTConfig(**VIT_SIZES, intermediate_size=64, num_register_tokens=2),
    "dinov3_convnext": lambda: tf.DINOv3ConvNextConfig(**STAGES),
    "convnext": lambda: tf.ConvNextConfig(**STAGES),
    "convnextv2": lambda: tf.ConvNextV2Config(**STAGES),
    "swin": lambda: tf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4
    ),
}
# The model's own output that DINO trains on, for each family.
CLS_FAMILIES = {"vit", "deit"}


def _native_feature(model, pixel_values):
    if model.config.model_type in CLS_FAMILIES:
        return model(pixel_values, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    return model(pixel_values).pooler_output


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A folder saved with `save_pretrained` for every family, random weights."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    for name, config in CONFIGS.items():
        tf.AutoModel.from_config(config()).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_family_loads_every_weight_and_trains_on_its_own_feature(checkpoints, model_type):
    folder = checkpoints / model_type
    backbone = build_backbone(str(folder), drop_path_rate=0.1).eval()
    assert isinstance(backbone, TransformersBackbone)
    reference = tf.AutoModel.from_pretrained(folder).eval()
    assert type(backbone.model) is type(reference)
    saved = load_file(folder / "model.safetensors")
    state = on_disk_state_dict(backbone.model)
    assert state.keys() == saved.keys()
    for key, tensor in saved.items():  # the weights at step 0 are the checkpoint's
        assert torch.equal(state[key], tensor), key
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, tokens = backbone.forward_tokens(pixel_values)
        torch.testing.assert_close(features, _native_feature(reference, pixel_values), rtol=0, atol=1e-6)
        assert torch.equal(backbone(pixel_values), features)
    assert features.shape == (2, backbone.num_features)
    grid = {"swin": 16, "convnext": 1, "convnextv2": 1, "dinov3_convnext": 1}.get(model_type, 16)  # final positions
    assert tokens.shape[:2] == (2, grid)
    # What the export's config says is the checkpoint's own stochastic depth.
    assert getattr(backbone.model.config, "drop_path_rate", None) == getattr(reference.config, "drop_path_rate", None)


def test_registers_and_class_tokens_are_not_patch_tokens(checkpoints):
    backbone = build_backbone(str(checkpoints / "dinov2_with_registers")).eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hidden = backbone.model(pixel_values).last_hidden_state  # CLS, 2 registers, 16 patches
        _, tokens = backbone.forward_tokens(pixel_values)
    assert torch.equal(tokens, hidden[:, 3:])


def test_a_vit_pooler_is_kept_untrained_and_named(checkpoints):
    backbone = build_backbone(str(checkpoints / "vit"))
    frozen = sorted(name for name, p in backbone.model.named_parameters() if not p.requires_grad)
    assert frozen == ["pooler.dense.bias", "pooler.dense.weight"]


def _damaged(checkpoints, tmp_path):
    folder = tmp_path / "damaged"
    tf.AutoModel.from_pretrained(checkpoints / "dinov2").save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["layernorm.weight"]
    tensors["encoder.layer.0.mlp.fc1.weights"] = tensors.pop("encoder.layer.0.mlp.fc1.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_damaged_checkpoint_is_refused_with_the_names(checkpoints, tmp_path):
    with pytest.raises(WeightLoadingError) as error:
        build_backbone(str(_damaged(checkpoints, tmp_path)))
    message = str(error.value)
    assert "2 tensor(s) missing from the checkpoint" in message
    assert "layernorm.weight" in message and "encoder.layer.0.mlp.fc1.weight" in message
    assert "1 tensor(s) in the checkpoint but not in the model: encoder.layer.0.mlp.fc1.weights" in message


def test_a_reshaped_tensor_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "reshaped"
    tf.AutoModel.from_pretrained(checkpoints / "dinov2").save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["layernorm.bias"] = torch.zeros(31)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightLoadingError, match=r"1 tensor\(s\) of a different shape: layernorm.bias \(31,\)"):
        build_backbone(str(folder))


def test_a_classifier_saved_with_the_backbone_is_dropped_not_refused(checkpoints, tmp_path, caplog):
    folder = tmp_path / "classifier"
    torch.manual_seed(1)
    classifier = tf.Dinov2ForImageClassification(tf.Dinov2Config(**VIT_SIZES, mlp_ratio=2, num_labels=3))
    classifier.save_pretrained(folder)
    with caplog.at_level("WARNING"):
        backbone = build_backbone(str(folder))
    assert type(backbone.model) is tf.Dinov2Model
    assert "classifier.weight" in caplog.text
    state = {key.removeprefix("dinov2."): tensor for key, tensor in on_disk_state_dict(backbone.model).items()}
    saved = {key.removeprefix("dinov2."): t for key, t in load_file(folder / "model.safetensors").items()}
    assert set(saved) - set(state) == {"classifier.weight", "classifier.bias"}
    for key, tensor in state.items():
        assert torch.equal(saved[key], tensor), key


def test_a_text_model_is_refused_with_what_is_accepted(tmp_path):
    tf.BertModel(
        tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert' model, not a vision backbone; expected a vision backbone"):
        build_backbone(str(tmp_path / "bert"))


@pytest.mark.parametrize(
    "model_type, size, message",
    [
        (
            "dinov2",
            12,
            "crop size 12 is not a multiple of the patch size 8 of this dinov2 model; use a multiple such as 8",
        ),
        ("vit", 20, "use a multiple such as 16"),
        ("convnext", 16, "use a size of at least 32, e.g. 32"),
        ("swin", 16, "below 32 px, the smallest image whose last stage still holds a 4 x 4 window"),
    ],
)
def test_a_crop_size_the_model_cannot_take_is_refused(checkpoints, model_type, size, message):
    backbone = build_backbone(str(checkpoints / model_type))
    with pytest.raises(ValueError, match=message):
        backbone.check_input_size(size)
    backbone.check_input_size(32)  # the native size goes through


def test_local_crops_go_through_every_vit_family(checkpoints):
    for model_type in ("vit", "deit", "dinov2", "dinov3_vit"):
        backbone = build_backbone(str(checkpoints / model_type)).eval()
        with torch.no_grad():
            assert backbone(torch.randn(1, 3, 16, 16)).shape == (1, 32), model_type


@pytest.mark.parametrize("model_type", ["dinov2", "dinov3_vit", "vit", "convnext", "swin"])
def test_the_export_is_the_input_class_and_loads_without_dino_hf(checkpoints, tmp_path, model_type):
    backbone = build_backbone(str(checkpoints / model_type)).eval()
    export = export_backbone(backbone, tmp_path / "export", image_size=32)
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == [type(backbone.model).__name__]
    assert "auto_map" not in config
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    cls_token = model_type in CLS_FAMILIES  # the feature is last_hidden_state[:, 0], not the pooled output
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel, pipeline\n"
        "from PIL import Image\n"
        f"model = AutoModel.from_pretrained({str(export)!r}).eval()\n"
        f"x = torch.load({str(tmp_path / 'pixels.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    out = model(x, interpolate_pos_encoding=True) if model.config.model_type == 'vit' else model(x)\n"
        f"feature = out.last_hidden_state[:, 0] if {model_type in CLS_FAMILIES} else out.pooler_output\n"
        f"torch.save(feature, {str(tmp_path / 'feature.pt')!r})\n"
        f"extractor = pipeline('image-feature-extraction', model={str(export)!r}, pool={cls_token is False})\n"
        "output = extractor(Image.new('RGB', (50, 40)), return_tensors=True)\n"
        f"assert tuple((output[:, 0] if {cls_token} else output).shape) == (1, {backbone.num_features})\n"
        "assert 'dino_hf' not in sys.modules\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    with torch.no_grad():
        feature = torch.load(tmp_path / "feature.pt", weights_only=True)
        torch.testing.assert_close(feature, backbone(pixel_values), rtol=0, atol=1e-5)
    processor = json.loads((export / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32} or processor["size"] == {"height": 32, "width": 32}


def test_a_vit_export_converts_back_to_a_dino_model(checkpoints, tmp_path):
    backbone = build_backbone(str(checkpoints / "vit")).eval()
    export = export_backbone(backbone, tmp_path / "export", image_size=32)
    dino = dino_from_vit(export, layer_norm_eps=backbone.model.config.layer_norm_eps).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dino(pixel_values).pooler_output, backbone(pixel_values), rtol=0, atol=1e-5)


def _timm_vit():
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )


def test_a_timm_vit_folder_gets_dynamic_image_size(tmp_path):
    torch.manual_seed(0)
    model = _timm_vit()
    timm.models.save_for_hf(model, tmp_path / "vit", safe_serialization=True)
    for spec in (str(tmp_path / "vit"), f"timm:local-dir:{tmp_path / 'vit'}"):
        backbone = build_backbone(spec, drop_path_rate=0.0).eval()
        assert isinstance(backbone, TimmBackbone)
        with torch.no_grad():
            torch.testing.assert_close(backbone(torch.ones(1, 3, 32, 32)), model.eval()(torch.ones(1, 3, 32, 32)))
            assert backbone(torch.randn(1, 3, 16, 16)).shape == (1, 32)  # a local crop


def test_a_timm_wrapper_folder_loads_with_its_weights(tmp_path):
    torch.manual_seed(0)
    timm_model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    wrapper = tf.TimmWrapperModel(tf.TimmWrapperConfig(architecture="resnet10t", num_classes=0))
    wrapper.timm_model.load_state_dict(timm_model.state_dict())
    wrapper.save_pretrained(tmp_path / "wrapper")
    backbone = build_backbone(str(tmp_path / "wrapper"), drop_path_rate=0.0).eval()
    for key, tensor in timm_model.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[key], tensor), key


def test_a_damaged_timm_folder_is_refused(tmp_path):
    timm.models.save_for_hf(_timm_vit(), tmp_path / "vit", safe_serialization=True)
    tensors = load_file(tmp_path / "vit" / "model.safetensors")
    del tensors["norm.weight"]
    save_file(tensors, tmp_path / "vit" / "model.safetensors")
    with pytest.raises(WeightLoadingError, match=r"1 tensor\(s\) missing from the checkpoint.*norm.weight"):
        build_backbone(str(tmp_path / "vit"))


def test_timm_dinov3_names_build_with_rope_at_any_size():
    backbone = build_backbone("timm:vit_small_patch16_dinov3", image_size=32, drop_path_rate=0.0).eval()
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 32, 32)).shape == (1, 384)
        assert backbone(torch.randn(1, 3, 16, 16)).shape == (1, 384)


@pytest.mark.parametrize("model_type", ["dinov2_with_registers", "dinov3_vit", "convnext"])
def test_exports_of_every_family_load_as_feature_models(checkpoints, tmp_path, model_type):
    from dino_hf.evaluation.feature_models import load_feature_model

    backbone = build_backbone(str(checkpoints / model_type)).eval()
    export = export_backbone(backbone, tmp_path / "export", image_size=32)
    feature_model, transform = load_feature_model(export)
    assert feature_model.image_size == 32
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(feature_model(pixel_values), backbone(pixel_values), rtol=0, atol=1e-6)
        if feature_model.has_tokens:
            (last,) = feature_model.last_blocks(pixel_values, 1)
            hidden = backbone.model(pixel_values).last_hidden_state
            torch.testing.assert_close(last, hidden, rtol=0, atol=1e-5)
            attention = feature_model.last_selfattention(pixel_values)
            assert attention.shape == (2, 2, hidden.shape[1], hidden.shape[1])
            torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, hidden.shape[1]))


def test_the_printed_loading_line_loads_each_kind_of_export(checkpoints, tmp_path):
    from dino_hf.convert.export import loading_snippet

    exports = {
        "Dinov2Model": export_backbone(
            build_backbone(str(checkpoints / "dinov2")), tmp_path / "dinov2", image_size=32
        ),
        "ResNet": export_backbone(build_backbone("timm:resnet10t"), tmp_path / "resnet", image_size=32),
    }
    for name, export in exports.items():
        line = loading_snippet(export)
        assert "dino_hf" not in line
        completed = subprocess.run(
            [sys.executable, "-c", f"{line}; assert type(model).__name__ == {name!r}, type(model)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize("model_type", ["vit", "dinov2", "dinov3_vit"])
def test_masked_patches_take_the_models_own_mask_token(checkpoints, model_type):
    from dino_hf.models.transformers_backbone import load_transformers_backbone

    backbone = load_transformers_backbone(str(checkpoints / model_type), mask_token=True).eval()
    token = backbone.model.embeddings.mask_token
    assert token.requires_grad
    if model_type == "vit":  # saved without one: added at zero, DINOv2's initialisation
        assert torch.equal(token, torch.zeros_like(token))
    with torch.no_grad():
        token.normal_()  # a non-zero token, so that masking changes the tokens
        pixel_values = torch.randn(2, 3, 32, 32)
        masked = torch.zeros(2, 16, dtype=torch.bool)
        masked[0, :5] = True
        _, plain = backbone.forward_tokens(pixel_values)
        _, tokens = backbone.forward_tokens(pixel_values, bool_masked_pos=masked)
        _, none_masked = backbone.forward_tokens(pixel_values, bool_masked_pos=torch.zeros_like(masked))
    assert torch.equal(none_masked, plain)
    assert not torch.allclose(tokens[0], plain[0]) and torch.allclose(tokens[1], plain[1], atol=1e-6)
    unmasked = load_transformers_backbone(str(checkpoints / "dinov2"))
    assert not unmasked.model.embeddings.mask_token.requires_grad  # kept as loaded when nothing is masked


def test_masked_patches_are_refused_for_a_cnn(checkpoints):
    from dino_hf.models.transformers_backbone import load_transformers_backbone

    with pytest.raises(ValueError, match="has no mask token for masked patches"):
        load_transformers_backbone(str(checkpoints / "convnext"), mask_token=True)
