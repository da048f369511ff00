import math

import numpy as np
import pytest
import torch
from processes import run_in_processes
from torch.nn import functional as F

from dino_hf.objectives.dino import DinoLoss, collapse_diagnostics, sinkhorn_knopp
from dino_hf.objectives.koleo import koleo_loss

K = 64
B = 3


def pairwise_loss(student_output, teacher_output, center, teacher_temp, student_temp=0.1):
    """Independent computation: the (teacher crop, student crop) cross-entropy matrix by einsum,
    diagonal (same view) removed, mean over the remaining entries."""
    ncrops = len(student_output) // B
    q = F.softmax((teacher_output - center) / teacher_temp, dim=-1).view(2, B, K)
    log_p = F.log_softmax(student_output / student_temp, dim=-1).view(ncrops, B, K)
    matrix = -torch.einsum("ibk,vbk->iv", q, log_p) / B  # (2, ncrops)
    keep = ~torch.eye(2, ncrops, dtype=torch.bool)
    return matrix[keep].mean(), int(keep.sum())


@pytest.mark.parametrize("nlocal, nterms", [(0, 2), (1, 4), (8, 18)])
def test_loss_equals_einsum_over_crop_pairs(nlocal, nterms):
    torch.manual_seed(0)
    ncrops = 2 + nlocal
    loss_fn = DinoLoss(K, ncrops)
    center = torch.randn(1, K) * 0.1
    loss_fn.center.copy_(center)
    student = torch.randn(ncrops * B, K, dtype=torch.float64)
    teacher = torch.randn(2 * B, K, dtype=torch.float64)
    loss_fn.double()

    loss = loss_fn(student, teacher, teacher_temp=0.04)
    expected, terms = pairwise_loss(student, teacher, center.double(), 0.04)

    assert terms == nterms  # 2 * ncrops - 2, docs/recipe.md#loss
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_loss_gradient_flows_to_student_only():
    torch.manual_seed(0)
    student = torch.randn(4 * B, K, requires_grad=True)
    teacher = torch.randn(2 * B, K, requires_grad=True)
    DinoLoss(K, 4)(student, teacher, 0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_center_update_follows_formula_after_the_loss():
    torch.manual_seed(0)
    loss_fn = DinoLoss(K, 4, center_momentum=0.9)
    student = torch.randn(4 * B, K)
    first, second = torch.randn(2 * B, K), torch.randn(2 * B, K)

    loss_fn(student, first, 0.04)
    center_1 = 0.1 * first.sum(0, keepdim=True) / (2 * B)
    torch.testing.assert_close(loss_fn.center, center_1)

    # The second loss uses the center from before its own update.
    loss = loss_fn(student, second, 0.04)
    expected, _ = pairwise_loss(student, second, center_1, 0.04)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss_fn.center, 0.9 * center_1 + 0.1 * second.mean(0, keepdim=True))


def test_center_is_saved_state():
    loss_fn = DinoLoss(K, 4)
    loss_fn(torch.randn(4 * B, K), torch.randn(2 * B, K), 0.04)
    restored = DinoLoss(K, 4)
    restored.load_state_dict(loss_fn.state_dict())
    assert list(loss_fn.state_dict()) == ["center"]
    assert torch.equal(restored.center, loss_fn.center)


def test_collapsed_teacher_gives_hand_derived_value():
    # Teacher outputs all equal (and center 0): q is uniform 1/K. Student rows put logit x on one
    # prototype and 0 elsewhere, so with u = x / 0.1:
    # sum_k -(1/K) log p_k = log(e^u + K - 1) - u / K for every pair.
    out_dim, x = 65536, 0.5
    loss_fn = DinoLoss(out_dim, 4)
    teacher = torch.full((2 * B, out_dim), 0.3, dtype=torch.float64)
    student = torch.zeros(4 * B, out_dim, dtype=torch.float64)
    student[torch.arange(4 * B), torch.arange(4 * B) % 7] = x
    loss_fn.double()
    u = x / 0.1
    expected = math.log(math.exp(u) + out_dim - 1) - u / out_dim
    assert loss_fn(student, teacher, 0.04).item() == pytest.approx(expected, rel=1e-12)

    # The collapse plateau (docs/failure_modes.md#uniform-collapse): student outputs also all equal -> ln K = 11.09.
    loss = DinoLoss(out_dim, 4)(torch.zeros(4 * B, out_dim), torch.zeros(2 * B, out_dim), 0.04)
    assert loss.item() == pytest.approx(math.log(out_dim), rel=1e-6)
    assert round(math.log(out_dim), 2) == 11.09


def test_shape_errors_name_the_fix():
    loss_fn = DinoLoss(K, 4)
    with pytest.raises(ValueError, match="ncrops=4"):
        loss_fn(torch.randn(3 * B, K), torch.randn(2 * B, K), 0.04)
    with pytest.raises(ValueError, match="out_dim"):
        loss_fn(torch.randn(4 * B, K + 1), torch.randn(2 * B, K + 1), 0.04)
    with pytest.raises(ValueError, match="at least 2"):
        DinoLoss(K, 1)


def test_diagnostics_of_uniform_and_one_hot_teacher():
    student = torch.randn(4 * B, K)
    loss_fn = DinoLoss(K, 4)
    center = loss_fn.center
    uniform = collapse_diagnostics(loss_fn.terms(student, torch.zeros(2 * B, K), 0.04), center)
    assert uniform["teacher_entropy"].item() == pytest.approx(math.log(K), rel=1e-6)
    assert uniform["teacher_max_prob"].item() == pytest.approx(1 / K, rel=1e-6)

    one_hot = torch.zeros(2 * B, K)
    one_hot[:, 5] = 10.0
    collapsed = collapse_diagnostics(loss_fn.terms(student, one_hot, 0.04), center)
    assert collapsed["distinct_prototypes"].item() == 1.0
    assert collapsed["teacher_max_prob"].item() == pytest.approx(1.0, abs=1e-6)
    assert collapsed["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-4)


def test_diagnostics_kl_is_loss_minus_teacher_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(6 * B, K, dtype=torch.float64), torch.randn(2 * B, K, dtype=torch.float64)
    center = torch.randn(1, K, dtype=torch.float64) * 0.1
    loss_fn = DinoLoss(K, 6).double()
    loss_fn.center.copy_(center)
    stats = {
        key: value.item() for key, value in collapse_diagnostics(loss_fn.terms(student, teacher, 0.07), center).items()
    }
    loss = loss_fn(student, teacher, 0.07).item()

    q = F.softmax((teacher - center) / 0.07, dim=-1)
    entropy = -(q * q.log()).sum(-1).mean().item()
    assert stats["teacher_entropy"] == pytest.approx(entropy, rel=1e-5)
    # Each teacher crop meets the same number of student crops, so the mean KL over the loss's
    # pairs is the loss minus the mean teacher entropy.
    assert stats["kl_teacher_student"] == pytest.approx(loss - entropy, rel=1e-5)
    assert stats["center_norm"] == pytest.approx(center.norm().item())
    assert stats["distinct_prototypes"] == float(len(set(q.argmax(-1).tolist())))


def _center_in_process(rank, world_size, results):
    torch.manual_seed(rank)
    teacher = torch.randn(2 * B, K)
    loss_fn = DinoLoss(K, 2)
    loss_fn(torch.randn(2 * B, K), teacher, 0.04)
    results[rank] = (teacher, loss_fn.center.clone())


@pytest.mark.slow
def test_center_is_mean_over_processes(tmp_path):
    world_size = 2
    results = run_in_processes(_center_in_process, world_size, tmp_path)
    all_teacher = torch.cat([results[rank][0] for rank in range(world_size)])
    expected = 0.1 * all_teacher.sum(0, keepdim=True) / (2 * B * world_size)
    for rank in range(world_size):
        torch.testing.assert_close(results[rank][1], expected)


# ---- Sinkhorn-Knopp centering (DINOv2) ------------------------------------------------------------


def sinkhorn_by_hand(logits, teacher_temp, n_iterations):
    """DINOv2's `sinkhorn_knopp_teacher` written from its formula in float64 numpy, one process."""
    q = np.exp(np.asarray(logits, dtype=np.float64) / teacher_temp).T  # (K, B)
    prototypes, samples = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(axis=1, keepdims=True) / prototypes
        q = q / q.sum(axis=0, keepdims=True) / samples
    return torch.from_numpy((q * samples).T)  # (B, K)


@pytest.mark.parametrize("n_iterations", [1, 3, 5])
def test_sinkhorn_knopp_equals_the_dinov2_formula(n_iterations):
    torch.manual_seed(0)
    logits = torch.randn(2 * B, K, dtype=torch.float64)
    expected = sinkhorn_by_hand(logits, 0.04, n_iterations)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.04, n_iterations), expected, rtol=1e-10, atol=1e-14)
    result = sinkhorn_knopp(logits.float(), 0.04, n_iterations)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-7)


def test_sinkhorn_knopp_does_not_overflow_where_exp_would():
    # exp(12 / 0.04) = exp(300) is inf in float32; the prototype-wise max taken out first keeps it finite.
    torch.manual_seed(0)
    logits = torch.randn(2 * B, K) * 4.0
    logits[0, 3] = 12.0
    assert not torch.isfinite(torch.exp(logits / 0.04)).all()
    result = sinkhorn_knopp(logits, 0.04, 3)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result.double(), sinkhorn_by_hand(logits, 0.04, 3), rtol=1e-4, atol=1e-7)


def test_sinkhorn_knopp_converges_to_equal_prototype_shares():
    """The defining property: each sample's distribution sums to 1 and, after enough iterations,
    every prototype gets an equal share B / K of the batch."""
    torch.manual_seed(0)
    samples = 2 * B
    logits = torch.randn(samples, K, dtype=torch.float64)
    result = sinkhorn_knopp(logits, 0.1, n_iterations=200)  # (B, K)
    torch.testing.assert_close(result.sum(dim=1), torch.ones(samples, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        result.sum(dim=0), torch.full((K,), samples / K, dtype=torch.float64), rtol=1e-6, atol=0
    )
    # The softmax of the same logits is far from equal shares: the normalisation is what makes them so.
    softmax_shares = F.softmax(logits / 0.1, dim=-1).sum(dim=0)
    assert (softmax_shares - samples / K).abs().max() > 0.1


def test_sinkhorn_centering_in_the_loss_ignores_and_keeps_the_center():
    torch.manual_seed(0)
    student = torch.randn(4 * B, K, dtype=torch.float64)
    teacher = torch.randn(2 * B, K, dtype=torch.float64)
    loss_fn = DinoLoss(K, 4, centering="sinkhorn_knopp", sinkhorn_iterations=3).double()
    center = 0.1 * torch.randn(1, K, dtype=torch.float64)
    loss_fn.center.copy_(center)

    terms = loss_fn.terms(student, teacher, 0.04)
    loss = loss_fn(student, teacher, 0.04)

    q = sinkhorn_by_hand(teacher, 0.04, 3).view(2, B, K)
    log_p = F.log_softmax(student / 0.1, dim=-1).view(4, B, K)
    pairs = [(-q[i] * log_p[v]).sum(-1).mean() for i in range(2) for v in range(4) if v != i]
    torch.testing.assert_close(loss, sum(pairs) / len(pairs), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms.teacher_probs, q, rtol=1e-10, atol=1e-14)
    assert not terms.teacher_probs.requires_grad
    assert torch.equal(loss_fn.center, center)  # neither used nor updated
    loss_fn.update_center(teacher)
    assert torch.equal(loss_fn.center, center)
    assert list(loss_fn.state_dict()) == ["center"]  # checkpoints keep their format
    stats = collapse_diagnostics(terms, None)
    assert "center_norm" not in stats
    assert stats["teacher_entropy"].item() == pytest.approx(-(q * q.log()).sum(-1).mean().item(), rel=1e-10)


def test_centering_options_are_checked():
    with pytest.raises(ValueError, match="'center' .* or 'sinkhorn_knopp'"):
        DinoLoss(K, 4, centering="sinkhorn")
    with pytest.raises(ValueError, match="sinkhorn_iterations=0 should be >= 1"):
        DinoLoss(K, 4, centering="sinkhorn_knopp", sinkhorn_iterations=0)


def _sinkhorn_in_process(rank, world_size, results):
    torch.manual_seed(rank)
    teacher = torch.randn(2 * B, K, dtype=torch.float64) * 3.0
    results[rank] = (teacher, sinkhorn_knopp(teacher, 0.04, 3))


@pytest.mark.slow
def test_sinkhorn_knopp_over_processes_equals_one_process_on_the_whole_batch(tmp_path):
    world_size = 2
    results = run_in_processes(_sinkhorn_in_process, world_size, tmp_path)
    whole = torch.cat([results[rank][0] for rank in range(world_size)])
    expected = sinkhorn_knopp(whole, 0.04, 3).view(world_size, 2 * B, K)
    for rank in range(world_size):
        torch.testing.assert_close(results[rank][1], expected[rank], rtol=1e-12, atol=1e-15)
    # Each process alone would normalise differently: the all-reduces are what make them agree.
    assert not torch.allclose(sinkhorn_knopp(results[0][0], 0.04, 3), expected[0], rtol=1e-6, atol=0)


# ---- KoLeo (DINOv2) --------------------------------------------------------------------------------


def koleo_by_hand(features, eps=1e-8):
    """-mean_i log(min_{j != i} ||x_i - x_j|| + eps) of the L2-normalised rows, by a double loop."""
    rows = features.double().tolist()
    x = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in rows]
    total = 0.0
    for i, xi in enumerate(x):
        nearest = min(math.sqrt(sum((a - b) ** 2 for a, b in zip(xi, xj))) for j, xj in enumerate(x) if j != i)
        total += math.log(nearest + eps)
    return -total / len(x)


def test_koleo_equals_the_brute_force_formula():
    torch.manual_seed(0)
    features = torch.randn(7, 5, dtype=torch.float64) * 3.0
    assert koleo_loss(features).item() == pytest.approx(koleo_by_hand(features), rel=1e-12)
    assert koleo_loss(features.float()).item() == pytest.approx(koleo_by_hand(features), rel=1e-5)


def test_koleo_ignores_mixed_precision():
    torch.manual_seed(0)
    features = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = koleo_loss(features)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, koleo_loss(features), rtol=0, atol=0)


def _min_distance(features):
    x = F.normalize(features.double(), dim=-1)
    distances = torch.cdist(x, x) + torch.eye(len(x), dtype=x.dtype) * 10
    return distances.min().item()


def test_koleo_gradient_pushes_nearest_neighbours_apart():
    torch.manual_seed(0)
    features = torch.randn(6, 8, dtype=torch.float64)
    features[1] = features[0] + 0.01 * torch.randn(8, dtype=torch.float64)  # one close pair
    features.requires_grad_(True)
    koleo_loss(features).backward()
    assert features.grad.abs().sum() > 0
    stepped = features.detach() - 1e-3 * features.grad
    assert _min_distance(stepped) > _min_distance(features.detach())
    assert koleo_loss(stepped) < koleo_loss(features.detach())


def test_koleo_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 images"):
        koleo_loss(torch.randn(1, 8))
