"""Distillation from several frozen models (dino_hf.objectives.multi_distillation): each teacher's terms against
formulas written out here, teacher dropping's rule, the one-teacher objective as the single-teacher term, the
state a checkpoint keeps, and the exported heads that map the student back into a teacher's space."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dino_hf import DinoConfig
from dino_hf.models.backbones import build_backbone
from dino_hf.models.distill_projector import DistillHeads, DistillProjector, TeacherHeads
from dino_hf.models.normalization import IMAGENET
from dino_hf.objectives.balancing import build_balancing
from dino_hf.objectives.distillation import Distillation, FrozenModel, queue_kl, similarity_kl, to_grid
from dino_hf.objectives.multi_distillation import MultiDistillation, Teacher, teacher_names
from dino_hf.objectives.teacher_dropping import teacher_keep_mask

B, SIZE = 4, 32


def frozen(hidden: int, seed: int, patch: int = 8) -> FrozenModel:
    torch.manual_seed(seed)
    config = DinoConfig(
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=SIZE,
        patch_size=patch,
    )
    backbone = build_backbone(config, drop_path_rate=0.0).eval().requires_grad_(False)
    return FrozenModel(backbone, f"teacher-{hidden}", IMAGENET)


def teachers(balancing: str = "phi_s", weights=(1.0, 0.5)) -> list[Teacher]:
    models = [frozen(32, 0), frozen(48, 1, patch=16)]
    return [
        Teacher(
            model, name, weight, build_balancing(balancing, model.num_features), model.num_features, model.num_features
        )
        for model, name, weight in zip(models, ["a", "b"], weights)
    ]


def fitted(term: MultiDistillation, views: list[torch.Tensor]) -> MultiDistillation:
    for view in views:
        term.observe(view)
    term.fit()
    return term


def student_outputs(term: MultiDistillation, seed: int = 2) -> tuple:
    """Random projected outputs of a student whose patch grid is 4 x 4, one pair per teacher."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        (
            torch.randn(B, t.summary_dim, generator=generator, requires_grad=True),
            torch.randn(B, 16, t.patch_dim, generator=generator, requires_grad=True),
        )
        for t in term.teachers
    )


def test_names_are_the_last_part_and_unique():
    specs = ["facebook/dinov2-small", "timm:vit_small_patch16_224.dino", "/data/models/dinov2-small/", "x/a b"]
    assert teacher_names(specs) == ["dinov2-small", "vit_small_patch16_224.dino", "dinov2-small-2", "a-b"]


def test_each_teachers_terms_equal_the_formulas():
    term = fitted(MultiDistillation(teachers()), [torch.randn(B, 3, SIZE, SIZE) for _ in range(3)])
    view = torch.randn(B, 3, SIZE, SIZE)
    projected = student_outputs(term)
    values = term(view, projected)
    assert list(values) == ["distill_global/a", "distill_local/a", "distill_global/b", "distill_local/b"]
    assert term.weights == {
        "distill_global/a": 1.0,
        "distill_local/a": 1.0,
        "distill_global/b": 0.5,
        "distill_local/b": 0.5,
    }
    for teacher, (summary, patches) in zip(term.teachers, projected):
        with torch.no_grad():
            target, target_patches = teacher.frozen.backbone.forward_tokens(view)
        cosine = F.cosine_similarity(summary, target, dim=-1)
        assert values[f"distill_global/{teacher.name}"].item() == pytest.approx((1 - cosine).mean().item(), rel=1e-6)
        balanced = teacher.balancing(target_patches)
        side = int(target_patches.shape[1] ** 0.5)
        resized = to_grid(patches, side)  # (B, side * side, C): the student's 4 x 4 grid on the teacher's
        regression = 0.9 * (1 - F.cosine_similarity(resized, balanced, dim=-1).mean()) + 0.1 * F.smooth_l1_loss(
            resized, balanced
        )
        assert values[f"distill_local/{teacher.name}"].item() == pytest.approx(regression.item(), rel=1e-5)
    # Every student output gets a gradient.
    sum(term.weights[name] * value for name, value in values.items()).backward()
    assert all(tensor.grad is not None and tensor.grad.abs().sum() > 0 for pair in projected for tensor in pair)


def test_the_balanced_targets_have_unit_variance_per_dimension():
    term = MultiDistillation(teachers())
    views = [torch.randn(B, 3, SIZE, SIZE) for _ in range(8)]
    fitted(term, views)
    teacher = term.teachers[0]
    with torch.no_grad():
        rows = torch.cat([teacher.balancing(teacher.frozen(view)[1]).flatten(0, 1) for view in views]).double()
    assert rows.mean(0).abs().max() < 1e-4
    torch.testing.assert_close(rows.var(0), torch.ones(teacher.patch_dim, dtype=torch.float64), rtol=1e-4, atol=1e-4)


def test_teacher_dropping_weighs_each_kept_pair_once():
    term = fitted(MultiDistillation(teachers(), drop_probability=0.5), [torch.randn(B, 3, SIZE, SIZE)])
    plain = fitted(MultiDistillation(teachers()), [torch.randn(B, 3, SIZE, SIZE)])
    plain.load_state_dict(term.state_dict())
    view, projected = torch.randn(B, 3, SIZE, SIZE), student_outputs(term)
    torch.manual_seed(7)
    dropped = term(view, projected)
    # By hand: each image's per-teacher losses, the keep mask drawn from the same seed, the kept pairs' mean.
    per_image = {}
    for teacher, (summary, patches) in zip(term.teachers, projected):
        target, target_patches = teacher.frozen(view)
        balanced = teacher.balancing(target_patches)
        resized = to_grid(patches, int(balanced.shape[1] ** 0.5))
        per_image[f"distill_global/{teacher.name}"] = 1 - F.cosine_similarity(summary, target, dim=-1)
        cosine = F.cosine_similarity(resized, balanced, dim=-1).mean(-1)
        smooth = F.smooth_l1_loss(resized, balanced, reduction="none").mean(-1).mean(-1)
        per_image[f"distill_local/{teacher.name}"] = 0.9 * (1 - cosine) + 0.1 * smooth
    losses = torch.stack(
        [
            sum(term.weights[key] * value for key, value in per_image.items() if key.endswith(f"/{name}"))
            for name in ("a", "b")
        ],
        dim=1,
    ).detach()
    torch.manual_seed(7)
    keep = teacher_keep_mask(losses, 0.5).float()
    for key, value in per_image.items():
        column = 0 if key.endswith("/a") else 1
        expected = 2 * (keep[:, column] * value).sum() / keep.sum()
        assert dropped[key].item() == pytest.approx(expected.item(), rel=1e-5)
    # With every pair kept, the values are the plain batch means.
    no_drop = plain(view, projected)
    for key, value in per_image.items():
        assert no_drop[key].item() == pytest.approx(value.mean().item(), rel=1e-5)


def test_one_teacher_with_the_single_teacher_losses_is_the_single_teacher_term():
    model = frozen(32, 0)
    single = Distillation(copy.deepcopy(model), queue_size=16)
    teacher = Teacher(model, "a", 1.0, build_balancing("none", 32), 32, 32)
    multi = MultiDistillation([teacher], global_loss="queue_kl", local_loss="similarity", queue_size=16)
    for _ in range(3):  # the queues fill the same way
        view = torch.randn(B, 3, SIZE, SIZE)
        summary, patches = torch.randn(B, 32), torch.randn(B, 16, 32)
        ours, reference = multi(view, ((summary, patches),)), single(view, summary, patches)
        assert ours["distill_global/a"].item() == pytest.approx(reference["distill_global"].item(), rel=1e-6)
        assert ours["distill_local/a"].item() == pytest.approx(reference["distill_local"].item(), rel=1e-6)
    torch.testing.assert_close(multi.queues[0].features, single.queue.features)
    target, target_patches = model(view)
    assert reference["distill_global"].item() == pytest.approx(
        queue_kl(target, summary, single.queue.features).item(), rel=1e-6
    )
    assert reference["distill_local"].item() == pytest.approx(
        similarity_kl(target_patches, to_grid(patches, 4)).item(), rel=1e-6
    )


def test_the_state_restores_the_balancing_and_the_queues_bit_for_bit():
    term = MultiDistillation(teachers(), global_loss="queue_kl", queue_size=8)
    fitted(term, [torch.randn(B, 3, SIZE, SIZE) for _ in range(2)])
    term(torch.randn(B, 3, SIZE, SIZE), student_outputs(term))  # the queues hold a batch
    state = term.state_dict()
    assert {key.split(".")[0] for key in state} == {"a", "b"}
    fresh = MultiDistillation(teachers(), global_loss="queue_kl", queue_size=8)
    assert not fresh.fitted
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.fitted
    view, projected = torch.randn(B, 3, SIZE, SIZE), student_outputs(term, seed=5)
    ours, theirs = term(view, projected), fresh(view, projected)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_the_exported_heads_map_the_student_into_each_teachers_space(tmp_path):
    term = fitted(MultiDistillation(teachers()), [torch.randn(B, 3, SIZE, SIZE) for _ in range(3)])
    heads = DistillHeads([DistillProjector(24, 20, t.patch_dim, summary_dim=t.summary_dim) for t in term.teachers])
    features, tokens = torch.randn(B, 24), torch.randn(B, 16, 20)
    for teacher, projector in zip(term.teachers, heads):
        weight, bias = teacher.balancing.inverse_affine()
        config = {**teacher.describe(), "kind": "linear", "student_feature_dim": 24, "student_patch_dim": 20}
        TeacherHeads(projector, weight, bias, config).save(tmp_path / teacher.name)
        loaded = TeacherHeads.from_folder(tmp_path / teacher.name)
        summary, patches = loaded(features, tokens)
        expected_summary, balanced = projector(features, tokens)
        torch.testing.assert_close(summary, expected_summary)
        torch.testing.assert_close(patches, teacher.balancing.inverse(balanced), rtol=1e-4, atol=1e-4)
        assert loaded.config["name"] == teacher.name and loaded.config["balancing"] == "PhiS"


def test_a_text_aligned_teachers_summary_head_is_a_bias_free_linear():
    head = DistillProjector(24, 20, 32, "mlp", summary_dim=16, text_aligned=True)
    assert isinstance(head.global_projection, torch.nn.Linear) and head.global_projection.bias is None
    assert head.global_projection.out_features == 16 and isinstance(head.patch_projection, torch.nn.Sequential)
