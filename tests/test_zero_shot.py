"""The zero-shot export of a distilled student (dino_hf/convert/zero_shot.py) and zero-shot evaluation
(dino_hf/evaluation/zero_shot.py, scripts/eval_zero_shot.py), on a tiny CLIP teacher with a word-level
tokenizer built here.

The export's scores are checked, in a process where dino_hf cannot be imported, against
softmax(exp(logit_scale) * cos(head(student feature), teacher text embedding)) computed here from the
teacher's own CLIPModel and the student itself."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers as tf
from clip_teacher import VISION_CONFIG, save_clip_teacher, text_config, word_tokenizer
from PIL import Image
from tiny import TINY_VIT

from dino_hf import DinoConfig, DinoModel
from dino_hf.command_line import run_script
from dino_hf.convert.zero_shot import export_zero_shot
from dino_hf.evaluation.features import ImageBatches
from dino_hf.evaluation.zero_shot import DEFAULT_TEMPLATES, load_zero_shot_model, zero_shot_logits

REPO = Path(__file__).resolve().parents[1]
EMBEDDING = 16  # the teacher's projection_dim: the summary head's output width
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # the student's, not the teacher's (CLIPImageProcessor's)
LABELS = ["red", "green", "blue", "cat"]
CLASSES = {"red": (220, 40, 40), "green": (40, 220, 40), "blue": (40, 40, 220), "dark_yellow": (120, 120, 10)}
CLASSES["grey"] = (128, 128, 128)  # 5 classes: top-5 is reported


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny CLIP teacher folder: CLIPModel (hidden 32, 2 layers, 32 px, patch 8, embeddings of 16),
    the word-level tokenizer and a 32 px CLIPImageProcessor."""
    return save_clip_teacher(tmp_path_factory.mktemp("teacher") / "clip", embedding=EMBEDDING)


def tiny_student(kind: str) -> torch.nn.Module:
    torch.manual_seed(1)
    if kind == "vit":  # its pooler (dense + tanh) is not the feature: the export replaces it
        return tf.ViTModel(tf.ViTConfig(**TINY_VIT)).eval()
    if kind == "dinov2":
        config = tf.Dinov2Config(**{**TINY_VIT, "mlp_ratio": 2}, layerscale_value=0.5)
        return tf.Dinov2Model(config).eval()
    if kind == "dino":
        return DinoModel(DinoConfig(**TINY_VIT)).eval()
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        embed_dim=32,
        depth=2,
        num_heads=2,
        img_size=32,
        patch_size=8,
        dynamic_img_size=True,
    ).eval()


@torch.no_grad()
def student_feature(kind: str, student: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the summary head reads, straight from the student: the CLS token after the final norm for the
    ViTs, timm's pooled features (num_classes=0) for timm."""
    if kind in ("vit", "dinov2"):
        return student(pixel_values=pixel_values).last_hidden_state[:, 0]
    if kind == "dino":
        return student(pixel_values).pooler_output
    return student(pixel_values)


def head_for(kind: str):
    """The summary head in each form export_zero_shot takes: a bias-free Linear, a Linear with an all-zero
    bias, its weight tensor. Returns (what is passed, its weight)."""
    torch.manual_seed(2)
    head = torch.nn.Linear(32, EMBEDDING, bias=kind == "timm")
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    weight = head.weight.detach().clone()
    return (weight if kind == "dinov2" else head), weight


KINDS = ("vit", "dinov2", "dino", "timm")


@pytest.fixture(scope="module")
def exports(teacher, tmp_path_factory) -> dict:
    """kind -> (export folder, student, head weight)."""
    root = tmp_path_factory.mktemp("exports")
    result = {}
    for kind in KINDS:
        student = tiny_student(kind)
        before = {key: tensor.clone() for key, tensor in student.state_dict().items()}
        head, weight = head_for(kind)
        folder = export_zero_shot(
            student, head, teacher, root / kind / "student_zero_shot", image_size=32, image_mean=MEAN, image_std=STD
        )
        after = student.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items()), kind
        result[kind] = (folder, student, weight)
    return result


def write_images(folder: Path, count: int, seed: int, colour=None) -> list[Path]:
    """`count` 32 x 32 PNGs of noise (around `colour` when given)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        centre = rng.integers(0, 256, 3) if colour is None else np.array(colour)
        pixels = np.clip(rng.normal(centre, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def normalised(paths: list[Path]) -> torch.Tensor:
    """`(N, 3, 32, 32)`: (pixel / 255 - MEAN) / STD, what the export's processor must give at its own size."""
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in paths]).float() / 255
    pixels = pixels.permute(0, 3, 1, 2)  # (N, 3, H, W)
    return (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@torch.no_grad()
def teacher_text_embeddings(teacher: Path, texts: list[str]) -> tuple[torch.Tensor, float]:
    """The teacher CLIPModel's own text embeddings of `texts` (padded to the longest) and exp(logit_scale)."""
    model = tf.CLIPModel.from_pretrained(teacher).eval()
    inputs = tf.AutoTokenizer.from_pretrained(teacher)(texts, padding=True, return_tensors="pt")
    return model.get_text_features(**inputs).pooler_output, model.logit_scale.exp().item()


def cosines(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T


# Runs the pipeline on every export where importing dino_hf fails; prints the scores and pixel values.
PIPELINE_WITHOUT_DINO_HF = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoDinoHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "dino_hf":
                raise ImportError("dino_hf is not importable in this process")

    sys.meta_path.insert(0, NoDinoHf())
    from PIL import Image
    from transformers import pipeline

    folders, paths, labels = json.loads(sys.argv[1])
    images = [Image.open(path) for path in paths]
    results = {}
    for name, folder in folders.items():
        classifier = pipeline("zero-shot-image-classification", model=folder)
        scores = classifier(images, candidate_labels=labels)
        results[name] = {
            "model": type(classifier.model).__name__,
            "scores": [{row["label"]: row["score"] for row in per_image} for per_image in scores],
            "pixel_values": classifier.image_processor(images=images, return_tensors="pt")["pixel_values"].tolist(),
        }
    results["dino_hf_modules"] = sorted(name for name in sys.modules if name.split(".")[0] == "dino_hf")
    print(json.dumps(results))
    """
)


def test_pipeline_without_dino_hf_gives_the_students_scores(teacher, exports, tmp_path):
    paths = write_images(tmp_path / "images", 3, seed=3)
    folders = {kind: str(folder) for kind, (folder, _, _) in exports.items()}
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", PIPELINE_WITHOUT_DINO_HF, json.dumps([folders, list(map(str, paths)), LABELS])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results.pop("dino_hf_modules") == []
    pixel_values = normalised(paths)
    # The pipeline's default hypothesis_template.
    texts, scale = teacher_text_embeddings(teacher, [f"This is a photo of {label}." for label in LABELS])
    for kind, (_, student, weight) in exports.items():
        result = results[kind]
        assert result["model"] == "VisionTextDualEncoderModel"
        torch.testing.assert_close(torch.tensor(result["pixel_values"]), pixel_values, rtol=0, atol=1e-5)
        images = student_feature(kind, student, pixel_values) @ weight.T  # (N, 16): the summary head's output
        expected = (scale * cosines(images, texts)).softmax(dim=-1)  # (N, labels)
        got = torch.tensor([[per_image[label] for label in LABELS] for per_image in result["scores"]])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=kind)
        assert expected.max(dim=-1).values.min() < 0.99  # not saturated: the comparison says something


@pytest.mark.parametrize(
    "head, message",
    [
        (torch.nn.Linear(32, EMBEDDING), "has a bias"),
        (torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, EMBEDDING)), "Sequential"),
        (torch.nn.Linear(24, EMBEDDING, bias=False), "reads 24 features but the student's feature has 32"),
        (torch.nn.Linear(32, 8, bias=False), "gives 8-d embeddings"),
    ],
    ids=["bias", "mlp", "student_width", "teacher_width"],
)
def test_heads_without_a_place_in_the_dual_encoder_are_refused(teacher, head, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        export_zero_shot(
            tiny_student("vit"), head, teacher, tmp_path / "out", image_size=32, image_mean=MEAN, image_std=STD
        )
    assert not (tmp_path / "out").exists()


def test_a_vit_at_another_size_and_teachers_other_than_clip_are_refused(tmp_path):
    siglip, metaclip, vit = tmp_path / "siglip", tmp_path / "metaclip_2", tmp_path / "vit"
    tf.SiglipModel(tf.SiglipConfig(text_config=text_config(64), vision_config=VISION_CONFIG)).save_pretrained(siglip)
    config = tf.MetaClip2Config(text_config=text_config(16), vision_config=VISION_CONFIG, projection_dim=32)
    tf.MetaClip2Model(config).save_pretrained(metaclip)
    tf.ViTModel(tf.ViTConfig(**TINY_VIT)).save_pretrained(vit)
    head = torch.nn.Linear(32, 32, bias=False)
    options = dict(image_mean=MEAN, image_std=STD)
    with pytest.raises(ValueError, match="export at image_size=32"):
        export_zero_shot(tiny_student("vit"), head, siglip, tmp_path / "out", image_size=48, **options)
    cases = {
        siglip: "is a siglip model; .*: a SigLIP text tower has no AutoModel entry",
        metaclip: r"text tower \(MetaClip2TextConfig\) has no AutoModel entry",
        vit: "is a vit model; the zero-shot export takes CLIP's text tower",
        tmp_path / "missing": "does not load as a transformers model folder with its text tower",
    }
    for teacher, message in cases.items():
        with pytest.raises(ValueError, match=message):
            export_zero_shot(tiny_student("vit"), head, teacher, tmp_path / "out", image_size=32, **options)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Zero-shot evaluation


def load_script():
    spec = importlib.util.spec_from_file_location("eval_zero_shot", REPO / "scripts" / "eval_zero_shot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """5 class sub-folders (one with an underscore) of 3 noisy 32 x 32 images of the class's colour."""
    root = tmp_path_factory.mktemp("zero_shot_data") / "val"
    for seed, (name, colour) in enumerate(CLASSES.items()):
        write_images(root / name, 3, seed=10 + seed, colour=colour)
    return root


def independent_logits(teacher: Path, exports: dict, root: Path, templates) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines of the vit student's head output with each class's prompt ensemble, computed class by class
    with the teacher's own CLIPModel; the images in sorted order of class and file."""
    folder, student, weight = exports["vit"]
    class_embeddings = []
    for name in sorted(CLASSES):
        texts, _ = teacher_text_embeddings(teacher, [t.format(name.replace("_", " ")) for t in templates])
        mean = torch.nn.functional.normalize(texts, dim=-1).mean(dim=0)
        class_embeddings.append(torch.nn.functional.normalize(mean, dim=0))
    paths = sorted(root.glob("*/*.png"))
    labels = torch.tensor([sorted(CLASSES).index(path.parent.name) for path in paths])
    images = student_feature("vit", student, normalised(paths)) @ weight.T
    return cosines(images, torch.stack(class_embeddings)), labels


def test_zero_shot_logits_equal_an_independent_computation(teacher, exports, labelled):
    templates = ("a photo of a {}.", "art of the {}.")
    expected, labels = independent_logits(teacher, exports, labelled, templates)
    rows = [{"image": str(path), "label": labels[i].item()} for i, path in enumerate(sorted(labelled.glob("*/*.png")))]
    model = load_zero_shot_model(str(exports["vit"][0]))
    batches = ImageBatches(rows, "image", model.transform, batch_size=4, label_column="label")
    names = [name.replace("_", " ") for name in sorted(CLASSES)]
    logits, got_labels = zero_shot_logits(model, batches, names, templates, device="cpu")
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert torch.equal(got_labels, labels)


def expected_accuracies(teacher, exports, labelled) -> tuple[float, float]:
    logits, labels = independent_logits(teacher, exports, labelled, DEFAULT_TEMPLATES)
    top1 = 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()
    top5 = 100.0 * (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()
    return top1, top5


def test_eval_zero_shot_main(teacher, exports, labelled, capsys):
    metrics = load_script().main(
        ["--model", str(exports["vit"][0]), "--eval_dir", str(labelled), "--num_workers", "0"]
    )
    top1, top5 = expected_accuracies(teacher, exports, labelled)
    assert metrics == pytest.approx({"top1": top1, "top5": top5})
    assert f"Top1: {top1:.2f}, Top5: {top5:.2f}" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_zero_shot_cli(teacher, exports, labelled):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval_zero_shot.py"), "--model", str(exports["vit"][0])]
        + ["--eval_dir", str(labelled), "--batch_size", "4", "--num_workers", "2"],
        env=env | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    top1, top5 = expected_accuracies(teacher, exports, labelled)
    assert f"Zero-shot classification: Top1: {top1:.2f}, Top5: {top5:.2f}" in completed.stdout
    assert "15 images, 0 skipped" in completed.stdout


def test_a_siglip_model_is_scored_on_text_padded_as_siglip_was_trained(tmp_path, labelled):
    """SigLIP reads the last of 64 positions: the class embeddings are those of text padded to 64 tokens,
    which differ from those of text padded to the longest."""
    folder = tmp_path / "siglip"
    torch.manual_seed(4)
    siglip = tf.SiglipModel(tf.SiglipConfig(text_config=text_config(64), vision_config=VISION_CONFIG)).eval()
    siglip.save_pretrained(folder)
    tokenizer = word_tokenizer(64)
    tokenizer.save_pretrained(folder)
    tf.SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD).save_pretrained(folder)
    names = [name.replace("_", " ") for name in sorted(CLASSES)]
    prompts = [f"a photo of a {name}." for name in names]
    paths = sorted(labelled.glob("*/*.png"))
    with torch.no_grad():
        padded = tokenizer(prompts, padding="max_length", max_length=64, return_tensors="pt")
        texts = siglip.get_text_features(**padded).pooler_output
        longest = siglip.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
        images = siglip.get_image_features(pixel_values=normalised(paths)).pooler_output
    assert not torch.allclose(texts, longest, atol=1e-3)
    rows = [{"image": str(path), "label": sorted(CLASSES).index(path.parent.name)} for path in paths]
    model = load_zero_shot_model(str(folder))
    batches = ImageBatches(rows, "image", model.transform, batch_size=8, label_column="label")
    logits, _ = zero_shot_logits(model, batches, names, ["a photo of a {}."], device="cpu")
    torch.testing.assert_close(logits, cosines(images, texts), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "is not a folder"),
        ("one_class", "has 0 class sub-folders; zero-shot classification needs at least 2"),
        ("no_text_tower", "is a vit model, which has no text tower"),
        ("template", "has no {} for the class name"),
    ],
)
def test_eval_zero_shot_refusals(case, message, teacher, labelled, tmp_path, capsys):
    tf.ViTModel(tf.ViTConfig(**TINY_VIT)).save_pretrained(tmp_path / "vit")
    argv = {
        "missing": ["--model", str(teacher), "--eval_dir", str(tmp_path / "nowhere")],
        "one_class": ["--model", str(teacher), "--eval_dir", str(labelled / "red")],
        "no_text_tower": ["--model", str(tmp_path / "vit"), "--eval_dir", str(labelled)],
        "template": ["--model", str(teacher), "--eval_dir", str(labelled), "--templates", "a photo"],
    }[case]
    script = load_script()
    capsys.readouterr()  # what saving the ViT printed
    assert run_script(lambda: script.main(argv), "eval_zero_shot.py") == 2
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.slow
def test_eval_zero_shot_cli_refuses_in_one_line(tmp_path):
    write_images(tmp_path / "flat", 2, seed=5)  # images, but no class sub-folders
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "eval_zero_shot.py"),
            "--model",
            "x/y",
            "--eval_dir",
            str(tmp_path / "flat"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"eval_zero_shot.py: error: --eval_dir {tmp_path / 'flat'} has 0 class sub-folders; zero-shot "
        "classification needs at least 2, each holding the images of the class it is named after"
    ]
