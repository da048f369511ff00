"""Distillation from a frozen model (dino_hf/objectives/distillation.py): the terms against independent
formulas, the queue, the grids, the frozen model's normalisation and immutability, and the step."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from test_trainer_step import HostReads
from tiny import TINY_VIT

from dino_hf.models.backbones import build_backbone
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.distill_projector import DistillProjector
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.models.normalization import IMAGENET, Normalization
from dino_hf.objectives.dino import DinoLoss
from dino_hf.objectives.distillation import (
    Distillation,
    FeatureQueue,
    FrozenModel,
    cosine_regression,
    queue_kl,
    queue_size_for,
    similarity_kl,
    to_grid,
)
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.step import StepValues, train_step
from dino_hf.training.teacher import build_teacher

STEP = dict(lr=0.01, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, clip_grad=1.0, freeze_last_layer=False)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def test_queue_kl_matches_the_formula_row_by_row():
    rng = np.random.default_rng(0)
    t, s, queue = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.normal(size=(7, 5))
    queue = np.stack([_unit(q) for q in queue])
    expected = np.mean(
        [_kl(_softmax(queue @ _unit(ti) / 0.07), _softmax(queue @ _unit(si) / 0.07)) for ti, si in zip(t, s)]
    )
    got = queue_kl(*(torch.tensor(x, dtype=torch.float64) for x in (t, s, queue)))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert queue_kl(torch.tensor(t), torch.tensor(t), torch.tensor(queue)).item() == pytest.approx(0, abs=1e-6)


def test_similarity_kl_matches_the_formula_row_by_row():
    rng = np.random.default_rng(1)
    t, s = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 4, 6))
    rows = []
    for ti, si in zip(t, s):
        ti, si = np.stack([_unit(x) for x in ti]), np.stack([_unit(x) for x in si])
        for i in range(4):
            rows.append(_kl(_softmax(ti @ ti[i] / 0.07), _softmax(si @ si[i] / 0.07)))
    got = similarity_kl(torch.tensor(t), torch.tensor(s))
    assert got.item() == pytest.approx(np.mean(rows), rel=1e-5)


def test_cosine_regression_is_cosine_and_smooth_l1_per_patch():
    rng = np.random.default_rng(2)
    t, s = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    cosines, smooth = [], []
    for ti, si in zip(t.reshape(-1, 4), s.reshape(-1, 4)):
        cosines.append(float(_unit(ti) @ _unit(si)))
        d = np.abs(si - ti)
        smooth.append(float(np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5))))
    expected = 0.9 * (1 - np.mean(cosines)) + 0.1 * np.mean(smooth)
    assert cosine_regression(torch.tensor(t), torch.tensor(s)).item() == pytest.approx(expected, rel=1e-6)
    assert cosine_regression(torch.tensor(t), torch.tensor(t)).item() == pytest.approx(0, abs=1e-7)


def test_queue_size_follows_the_dataset_size():
    sizes = {10: 16, 50: 16, 51: 32, 100: 32, 250: 64, 500: 128, 1000: 256, 2000: 512, 3000: 1024, 10000: 2048}
    for images, size in {**sizes, 20000: 4096, 20001: 8192, None: 8192}.items():
        assert queue_size_for(images) == size, images


def test_the_queue_keeps_the_last_features_in_a_ring_and_round_trips():
    queue = FeatureQueue(5, 2)
    rows = torch.arange(16, dtype=torch.float32).view(8, 2)
    queue.push_(rows[:3])
    assert torch.equal(queue.features[:3], rows[:3]) and not queue.features[3:].any()
    queue.push_(rows[3:7])  # wraps: 3, 4 at the end, 5, 6 at the start
    assert torch.equal(queue.features, torch.cat([rows[5:7], rows[2:5]]))
    queue.push_(torch.arange(100, 114, dtype=torch.float32).view(7, 2))  # more than it holds: the last 5
    assert sorted(queue.features[:, 0].tolist()) == [104, 106, 108, 110, 112]
    restored = FeatureQueue(5, 2)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.features, queue.features) and restored._position == queue._position
    extra = torch.full((1, 2), -1.0)
    queue.push_(extra)
    restored.push_(extra)
    assert torch.equal(restored.features, queue.features)


def test_student_patches_are_resized_to_the_frozen_grid():
    tokens = torch.randn(2, 49, 3)  # a 7 x 7 grid
    expected = F.interpolate(tokens.view(2, 7, 7, 3).permute(0, 3, 1, 2), size=(4, 4), mode="bilinear")
    torch.testing.assert_close(to_grid(tokens, 4), expected.flatten(2).transpose(1, 2))
    assert to_grid(tokens, 7) is tokens
    constant = torch.ones(1, 49, 3)
    torch.testing.assert_close(to_grid(constant, 16), torch.ones(1, 256, 3))


def _dinov2_patch14(tmp_path):
    """A tiny transformers Dinov2 with 14 px patches, saved with a 0.5 / 0.5 processor."""
    config = tf.Dinov2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14)
    torch.manual_seed(0)
    tf.Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    processor = tf.BitImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(tmp_path / "dinov2")
    return tmp_path / "dinov2"


def test_the_frozen_model_reads_pixels_in_its_own_normalisation(tmp_path):
    backbone = build_backbone(str(_dinov2_patch14(tmp_path)), drop_path_rate=0.0)
    assert (backbone.image_mean, backbone.image_std) == ((0.5,) * 3, (0.5,) * 3)
    frozen = FrozenModel(backbone, "dinov2", IMAGENET)
    raw = torch.rand(2, 3, 56, 56)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    features, patches = frozen((raw - mean) / std)
    stock = tf.Dinov2Model.from_pretrained(tmp_path / "dinov2").eval()
    with torch.no_grad():
        output = stock((raw - 0.5) / 0.5)
    torch.testing.assert_close(features, output.pooler_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(patches, output.last_hidden_state[:, 1:], rtol=0, atol=1e-5)
    assert not features.is_inference() and not features.requires_grad
    same = FrozenModel(backbone, "dinov2", Normalization((0.5,) * 3, (0.5,) * 3))
    assert not same.converts


def test_the_frozen_model_stays_frozen_in_eval_mode(tmp_path):
    frozen = FrozenModel(build_backbone(str(_dinov2_patch14(tmp_path)), drop_path_rate=0.0), "dinov2", IMAGENET)
    frozen.train()
    assert not frozen.training and not frozen.backbone.training
    assert not any(p.requires_grad for p in frozen.parameters())


def test_a_patch14_frozen_model_is_met_on_its_grid_or_at_its_own_size(tmp_path):
    frozen_backbone = build_backbone(str(_dinov2_patch14(tmp_path)), drop_path_rate=0.0)
    view = torch.randn(2, 3, 64, 64)
    # At the view's size the frozen model's grid is 4 x 4 (64 // 14), as a patch-16 student's at 64 px.
    at_view = Distillation(FrozenModel(frozen_backbone, "dinov2", IMAGENET), 4, global_weight=0)
    _, patches = at_view.frozen(view)
    assert patches.shape == (2, 16, 24)
    # A CNN student's 2 x 2 map goes up to the frozen grid.
    values = at_view(view, torch.randn(2, 24), torch.randn(2, 4, 24))
    assert set(values) == {"distill_local"}
    # --distill_teacher_size 28: the frozen model sees 28 px and its grid is 2 x 2.
    seen = []
    frozen = FrozenModel(frozen_backbone, "dinov2", IMAGENET, input_size=28)
    frozen.backbone.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape[-1]), with_kwargs=True
    )
    resized = Distillation(frozen, 4, global_weight=0)
    student_small = torch.randn(2, 4, 24)
    value = resized(view, torch.randn(2, 24), student_small)["distill_local"]
    _, patches = frozen(view)
    assert seen[0] == 28 and patches.shape == (2, 4, 24)
    assert value.item() == pytest.approx(similarity_kl(patches, student_small).item(), rel=1e-6)


def _distillation_networks(tmp_path, dino: bool):
    """A tiny ViT student with projectors to a frozen Dinov2 (patch 14, 24 wide), and its teacher."""
    frozen_backbone = build_backbone(str(_dinov2_patch14(tmp_path)), drop_path_rate=0.0)
    torch.manual_seed(1)
    backbone = build_backbone(DinoConfig(**TINY_VIT), drop_path_rate=0.0)
    projector = DistillProjector(32, 32, 24)
    if dino:
        from dino_hf.models.heads import DinoHead

        student = MultiCropWrapper(backbone, DinoHead(32, 64, hidden_dim=32, bottleneck_dim=16), None, projector)
    else:
        student = MultiCropWrapper(backbone, torch.nn.Identity(), distill_projector=projector)
    distillation = Distillation(FrozenModel(frozen_backbone, "dinov2", IMAGENET), 8)
    return student, build_teacher(student), distillation


@pytest.mark.parametrize("dino", [False, True])
def test_a_distillation_step_trains_the_student_never_the_frozen_model_and_reads_nothing_back(tmp_path, dino):
    student, teacher, distillation = _distillation_networks(tmp_path, dino)
    frozen_before = {k: v.clone() for k, v in distillation.frozen.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = build_optimizer("adamw", get_param_groups(student), device="cpu")
    crops = [torch.randn(4, 3, 32, 32) for _ in range(2 if dino else 1)]
    dino_options = {} if dino else {"dino_weight": 0.0}
    for step in range(3):
        with HostReads() as reads:
            stats = train_step(
                student,
                teacher,
                DinoLoss(64, 2),
                optimizer,
                crops,
                StepValues(**dino_options, **STEP),
                accumulation_steps=2,
                terms=[distillation],
            )
        if step:
            assert reads.calls == [], reads.calls
    assert {"distill_global", "distill_local"} <= set(stats)
    assert ("total_loss" in stats) == dino
    assert all(math.isfinite(v.item()) for v in stats.values())
    for name, tensor in distillation.frozen.state_dict().items():
        assert torch.equal(tensor, frozen_before[name]), name
    assert all(p.grad is None for p in distillation.frozen.parameters())
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.startswith("distill_projector.") for k in moved) and any(k.startswith("backbone.") for k in moved)
    assert distillation.queue._position == (3 * 4) % 8  # 4 images a step, in micro-batches of 2


def test_every_trainable_student_parameter_gets_a_gradient_from_distillation(tmp_path):
    student, _, distillation = _distillation_networks(tmp_path, dino=False)
    view = torch.randn(2, 3, 32, 32)
    projected = student([view], heads=False, project=True)
    sum(distillation(view, *projected).values()).backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    # DinoModel's mask token only enters with iBOT's masked patches.
    assert missing in ([], ["backbone.model.embeddings.mask_token"]), missing


def test_the_evaluations_find_a_distillation_runs_student(tmp_path):
    from dino_hf.evaluation.feature_models import _model_folder

    export = tmp_path / "run" / "checkpoints" / "checkpoint-8" / "student_backbone"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    assert _model_folder(export.parent) == export  # a checkpoint
    assert _model_folder(tmp_path / "run" / "checkpoints") == export  # its latest checkpoint
    (tmp_path / "run" / "student_backbone").mkdir()
    assert _model_folder(tmp_path / "run") == tmp_path / "run" / "student_backbone"  # a run's output folder
