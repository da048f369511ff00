"""Frozen teachers from image-text models and RADIO (`dino_hf.models.text_aligned`), and timm's image towers of
image-text models: each gives the stock model's own global feature and patch tokens, reads its processor's
normalisation, says whether its feature is text-aligned, loads every vision weight (the text side alone left
out), and is refused as a student."""

import json

import pytest
import timm
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

from dino_hf.models.backbones import TeacherBackbone, TimmBackbone, build_backbone
from dino_hf.models.normalization import IMAGENET, UNNORMALIZED, Normalization
from dino_hf.models.text_aligned import Aimv2VisionModelWithProjection, timm_text_aligned
from dino_hf.models.transformers_backbone import check_vision_config
from dino_hf.models.weight_check import WeightLoadingError, on_disk_state_dict
from dino_hf.objectives.distillation import FrozenModel

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    vocab_size=99,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
PROJECTION_DIM = 24
# Neither ImageNet's nor any family's default: read from the processor, or the test fails.
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
PROCESSOR_SIZE = 48  # the processors' size, not the configs' 32: read from the processor too
CLIP_PROCESSOR = dict(image_mean=MEAN, image_std=STD, size={"shortest_edge": 48}, crop_size=48)


def _clip_processor():
    tokenizer = tf.CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}, merges=[])
    return tf.CLIPProcessor(image_processor=tf.CLIPImageProcessor(**CLIP_PROCESSOR), tokenizer=tokenizer)


# model type -> (the stock model, its processor (None: none saved), text-aligned or not, tokens before the patches)
FAMILIES = {
    "clip": (
        lambda: tf.CLIPModel(
            tf.CLIPConfig(vision_config=dict(VISION, image_size=32), text_config=TEXT, projection_dim=PROJECTION_DIM)
        ),
        _clip_processor,  # saved by transformers v5 as processor_config.json, the image processor nested
        True,
        1,
    ),
    "clip_vision_model": (
        lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION, image_size=32)),
        lambda: tf.CLIPImageProcessor(**CLIP_PROCESSOR),
        False,
        1,
    ),
    "metaclip_2": (
        lambda: tf.MetaClip2Model(
            tf.MetaClip2Config(
                vision_config=dict(VISION, image_size=32), text_config=TEXT, projection_dim=PROJECTION_DIM
            )
        ),
        lambda: tf.CLIPImageProcessor(**CLIP_PROCESSOR),
        True,
        1,
    ),
    "metaclip_2_vision_model": (
        lambda: tf.MetaClip2VisionModel(tf.MetaClip2VisionConfig(**VISION, image_size=32)),
        lambda: tf.CLIPImageProcessor(**CLIP_PROCESSOR),
        False,
        1,
    ),
    "siglip": (
        lambda: tf.SiglipModel(tf.SiglipConfig(vision_config=dict(VISION, image_size=32), text_config=TEXT)),
        lambda: tf.SiglipImageProcessor(image_mean=MEAN, image_std=STD, size={"height": 48, "width": 48}),
        True,
        0,
    ),
    "siglip_vision_model": (
        lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION, image_size=32)),
        lambda: tf.SiglipImageProcessor(image_mean=MEAN, image_std=STD, size={"height": 48, "width": 48}),
        True,
        0,
    ),
    "siglip2": (
        lambda: tf.Siglip2Model(tf.Siglip2Config(vision_config=dict(VISION, num_patches=16), text_config=TEXT)),
        lambda: tf.Siglip2ImageProcessor(image_mean=MEAN, image_std=STD, max_num_patches=36, patch_size=8),
        True,
        0,
    ),
    "siglip2_vision_model": (
        lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**VISION, num_patches=16)),
        lambda: tf.Siglip2ImageProcessor(image_mean=MEAN, image_std=STD, max_num_patches=36, patch_size=8),
        True,
        0,
    ),
    "aimv2": (
        lambda: tf.Aimv2Model(
            tf.Aimv2Config(vision_config=dict(VISION, image_size=32), text_config=TEXT, projection_dim=PROJECTION_DIM)
        ),
        lambda: tf.CLIPImageProcessor(**CLIP_PROCESSOR),
        True,
        0,
    ),
    "aimv2_vision_model": (
        lambda: tf.Aimv2VisionModel(tf.Aimv2VisionConfig(**VISION, image_size=32)),
        lambda: tf.CLIPImageProcessor(**CLIP_PROCESSOR),
        False,
        0,
    ),
    "radio": (
        lambda: tf.RadioModel(
            tf.RadioConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                patch_size=8,
                image_size=32,
                max_img_size=64,
                num_cls_tokens=2,
                num_registers=1,
            )
        ),
        None,
        False,
        3,
    ),
}
DUAL = ("clip", "metaclip_2", "siglip", "siglip2", "aimv2")
TEXT_SIDE = ("text_model.", "text_projection.", "logit_scale", "logit_bias")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A folder saved with `save_pretrained` for every family, random weights, with its processor."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    for model_type, (model, processor, _, _) in FAMILIES.items():
        model().save_pretrained(root / model_type)
        if processor is not None:
            processor().save_pretrained(root / model_type)
    return root


def _stock_outputs(model, pixel_values):
    """The stock model's own global feature and full `last_hidden_state` (RADIO: its summary and features)."""
    model_type = model.config.model_type
    if model_type == "radio":
        outputs = model(pixel_values)
        return outputs.summary, outputs.features
    if model_type.startswith("siglip2"):  # NaFlex: the patches the processor's own function cuts
        rows, cols = pixel_values.shape[-2] // 8, pixel_values.shape[-1] // 8
        inputs = dict(
            pixel_values=torch.stack([convert_image_to_patches(image, 8) for image in pixel_values]),
            pixel_attention_mask=torch.ones(len(pixel_values), rows * cols, dtype=torch.int32),
            spatial_shapes=torch.tensor([[rows, cols]] * len(pixel_values)),
        )
    elif model_type.startswith("aimv2"):  # learned position embeddings of one size: no interpolation
        inputs = dict(pixel_values=pixel_values)
    else:
        inputs = dict(pixel_values=pixel_values, interpolate_pos_encoding=True)
    if hasattr(model, "get_image_features"):  # a dual model: the image embedding its text tower is aligned with
        outputs = model.get_image_features(**inputs)
    else:
        outputs = model(**inputs)
    return outputs.pooler_output, outputs.last_hidden_state


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_gives_the_stock_models_feature_and_patch_tokens(folders, model_type):
    folder = folders / model_type
    _, processor, text_aligned, prefix_tokens = FAMILIES[model_type]
    backbone = build_backbone(str(folder), drop_path_rate=0.0, frozen=True)
    assert isinstance(backbone, TeacherBackbone)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert backbone.text_aligned is text_aligned and backbone.source == str(folder)
    expected = UNNORMALIZED if model_type == "radio" else Normalization(MEAN, STD)  # RADIO normalises itself
    assert (backbone.image_mean, backbone.image_std) == expected
    assert backbone.image_size == (PROCESSOR_SIZE if processor is not None else 32)
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]  # the class saved
    reference = getattr(tf, architecture).from_pretrained(folder).eval()
    sizes = (32,) if model_type.startswith("aimv2") else (32, 48)  # and at another size than the native one
    for size in sizes:
        pixel_values = torch.randn(2, 3, size, size)
        with torch.no_grad():
            feature, tokens = backbone.forward_tokens(pixel_values)
            stock_feature, stock_tokens = _stock_outputs(reference, pixel_values)
            torch.testing.assert_close(feature, stock_feature, rtol=0, atol=1e-5)
            if model_type != "radio":  # RADIO's features are its patch tokens already
                stock_tokens = stock_tokens[:, prefix_tokens:]
            torch.testing.assert_close(tokens, stock_tokens, rtol=0, atol=1e-5)
            assert torch.equal(backbone(pixel_values), feature)
        assert feature.shape == (2, backbone.num_features)
        assert tokens.shape == (2, (size // 8) ** 2, backbone.num_patch_features)
    assert backbone.num_features == (PROJECTION_DIM if model_type in ("clip", "metaclip_2", "aimv2") else 32) * (
        2 if model_type == "radio" else 1
    )


@pytest.mark.parametrize("model_type", DUAL)
def test_a_dual_folder_loads_every_vision_weight_and_leaves_out_exactly_the_text_side(folders, model_type):
    folder = folders / model_type
    backbone = build_backbone(str(folder), drop_path_rate=0.0, frozen=True)
    loaded = on_disk_state_dict(backbone.model)
    saved = load_file(folder / "model.safetensors")
    used = set()
    for key, tensor in saved.items():
        name = key if key in loaded else key.removeprefix("vision_model.")
        if name in loaded:
            assert torch.equal(loaded[name], tensor), key
            used.add(name)
        else:
            assert key.startswith(TEXT_SIDE), key
            assert not key.startswith(("vision_model.", "visual_projection.")), key
    assert used == set(loaded)
    assert not any(name.startswith("text_") for name in loaded)


@pytest.mark.parametrize("model_type", [*DUAL, "siglip_vision_model", "radio"])
def test_a_checkpoint_missing_one_vision_tensor_is_refused(folders, tmp_path, model_type):
    saved = load_file(folders / model_type / "model.safetensors")
    vision = sorted(key for key in saved if not key.startswith(TEXT_SIDE))
    missing = vision[len(vision) // 2]
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text((folders / model_type / "config.json").read_text())
    save_file({key: tensor for key, tensor in saved.items() if key != missing}, folder / "model.safetensors")
    with pytest.raises(WeightLoadingError, match="missing from the checkpoint"):
        build_backbone(str(folder), drop_path_rate=0.0, frozen=True)


@pytest.mark.parametrize("model_type", ["clip", "aimv2"])
def test_a_dual_checkpoint_without_its_projection_is_refused(folders, tmp_path, model_type):
    saved = load_file(folders / model_type / "model.safetensors")
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text((folders / model_type / "config.json").read_text())
    save_file({key: t for key, t in saved.items() if key != "visual_projection.weight"}, folder / "model.safetensors")
    with pytest.raises(WeightLoadingError, match="1 tensor.s. missing from the checkpoint.*visual_projection"):
        build_backbone(str(folder), drop_path_rate=0.0, frozen=True)


def test_a_clip_vision_folder_saved_with_its_projection_is_text_aligned(tmp_path):
    model = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**VISION, image_size=32, projection_dim=16)).eval()
    model.save_pretrained(tmp_path / "clip")
    backbone = build_backbone(str(tmp_path / "clip"), drop_path_rate=0.0, frozen=True)
    assert backbone.text_aligned and backbone.num_features == 16
    defaults = tf.CLIPImageProcessor()  # no processor saved: CLIP's processor defaults
    assert (backbone.image_mean, backbone.image_std) == (tuple(defaults.image_mean), tuple(defaults.image_std))
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(pixel_values), model(pixel_values).image_embeds, rtol=0, atol=1e-5)


def test_a_tower_without_a_pooling_head_gives_the_mean_of_its_patch_tokens_not_text_aligned(tmp_path):
    model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION, image_size=32, vision_use_head=False)).eval()
    model.save_pretrained(tmp_path / "siglip")
    backbone = build_backbone(str(tmp_path / "siglip"), drop_path_rate=0.0, frozen=True)
    assert not backbone.text_aligned
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).last_hidden_state.mean(1)
        torch.testing.assert_close(backbone(pixel_values), expected, rtol=0, atol=1e-5)


def test_aimv2s_image_side_with_projection_is_get_image_features(folders):
    dual = tf.Aimv2Model.from_pretrained(folders / "aimv2").eval()
    config = dual.config.vision_config
    config.projection_dim = dual.config.projection_dim
    image_side = Aimv2VisionModelWithProjection.from_pretrained(folders / "aimv2", config=config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = dual.get_image_features(pixel_values=pixel_values).pooler_output
        torch.testing.assert_close(image_side(pixel_values).pooler_output, expected, rtol=0, atol=1e-6)


def test_the_teacher_families_are_refused_as_students(folders):
    for model_type in ("clip", "siglip_vision_model", "radio"):
        with pytest.raises(ValueError, match="frozen teacher, not as a backbone to train; use it with --distill_from"):
            build_backbone(str(folders / model_type), drop_path_rate=0.1)
        with pytest.raises(ValueError, match="use it with --distill_from"):
            check_vision_config({"model_type": model_type}, model_type)
        assert check_vision_config({"model_type": model_type}, model_type, frozen=True) == model_type


def test_a_text_model_is_refused_as_a_teacher_too(tmp_path):
    tf.CLIPTextModel(tf.CLIPTextConfig(**TEXT)).save_pretrained(tmp_path / "clip_text")
    with pytest.raises(ValueError, match=r"is a 'clip_text_model' model, not a vision backbone; expected"):
        build_backbone(str(tmp_path / "clip_text"), drop_path_rate=0.0, frozen=True)
    with pytest.raises(ValueError, match="'bert' model, not a vision backbone"):
        check_vision_config({"model_type": "bert"}, "bert", frozen=True)


def test_a_fixed_size_aimv2_and_a_size_off_the_patch_grid_are_refused(folders):
    aimv2 = build_backbone(str(folders / "aimv2"), drop_path_rate=0.0, frozen=True)
    with pytest.raises(ValueError, match="learned for 32 px images only; use 32"):
        aimv2.check_input_size(48)
    aimv2.check_input_size(32)
    clip = build_backbone(str(folders / "clip"), drop_path_rate=0.0, frozen=True)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8 of this clip_vision_model model"):
        clip.check_input_size(36)
    clip.check_input_size(48)


def _normalized(pixels: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in normalization)
    return (pixels - mean) / std


def test_a_teacher_reads_the_students_crops_in_its_own_normalisation(folders):
    backbone = build_backbone(str(folders / "siglip"), drop_path_rate=0.0, frozen=True)
    frozen = FrozenModel(backbone, "siglip", IMAGENET)
    pixels = torch.rand(2, 3, 32, 32)
    features, patches = frozen(_normalized(pixels, IMAGENET))
    with torch.no_grad():
        expected_features, expected_patches = backbone.forward_tokens(_normalized(pixels, Normalization(MEAN, STD)))
    torch.testing.assert_close(features, expected_features, rtol=0, atol=1e-5)
    torch.testing.assert_close(patches, expected_patches, rtol=0, atol=1e-5)


TINY_TIMM = dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize(
    "name, width, prefix_tokens",
    [
        ("vit_base_patch16_clip_224.openai", 512, 1),  # the projection, timm's `head`
        ("vit_base_patch16_siglip_224.webli", 32, 0),  # the attention pooling; no head
        ("vit_pe_core_base_patch16_224.fb", 1024, 1),  # attention pooling, then the projection
    ],
)
def test_timm_image_towers_give_the_text_aligned_embedding_as_teachers(name, width, prefix_tokens):
    torch.manual_seed(0)
    backbone = build_backbone(f"timm:{name}", drop_path_rate=0.0, frozen=True, **TINY_TIMM)
    assert isinstance(backbone, TimmBackbone) and backbone.text_aligned and backbone.source == f"timm:{name}"
    assert not backbone.training and (backbone.num_features, backbone.num_patch_features) == (width, 32)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, tokens = backbone.forward_tokens(pixel_values)
        torch.testing.assert_close(features, backbone.model(pixel_values), rtol=0, atol=1e-6)  # timm's forward
        torch.testing.assert_close(tokens, backbone.model.forward_features(pixel_values)[:, prefix_tokens:])
    assert features.shape == (2, width) and tokens.shape == (2, 16, 32)
    # As a student, the same tower is trained on its pooled feature, without the head.
    student = build_backbone(f"timm:{name}", drop_path_rate=0.0, **TINY_TIMM).eval()
    assert not student.text_aligned and student.num_features == 32
    with torch.no_grad():
        pooled = student.model.forward_head(student.model.forward_features(pixel_values), pre_logits=True)
        torch.testing.assert_close(student(pixel_values), pooled)


def test_which_timm_towers_are_text_aligned():
    aligned = [
        "vit_base_patch16_clip_224.openai",
        "vit_large_patch14_clip_224.laion2b",
        "eva02_base_patch16_clip_224.merged2b",
        "vit_so400m_patch14_siglip_384.webli",
        "vit_pe_core_large_patch14_336.fb",
    ]
    not_aligned = [
        "vit_base_patch16_clip_224",  # timm's default tag is a classifier fine-tuned on ImageNet
        "vit_base_patch16_clip_224.openai_ft_in1k",
        "vit_so400m_patch14_siglip_378.webli_ft_in1k",
        "vit_base_patch16_siglip_gap_224.webli",
        "vit_pe_spatial_base_patch16_512.fb",
        "vit_small_patch16_224.augreg_in21k",
        "resnet50",
    ]
    assert all(timm_text_aligned(name) for name in aligned)
    assert not any(timm_text_aligned(name) for name in not_aligned)
    assert timm.is_model("vit_pe_core_base_patch16_224")  # the names above are timm's, not guesses
    student = build_backbone("timm:vit_base_patch16_clip_224.openai_ft_in1k", frozen=True, **TINY_TIMM)
    assert not student.text_aligned and student.num_features == 32  # built without the classifier
