"""Feature balancing of the teachers (dino_hf/objectives/balancing.py): PHI-S against an independent numpy
implementation (SVD of the centred data, Sylvester by Kronecker products), what PHI-S guarantees, the
Hadamard matrices of the supported widths, standardisation, the streaming and distributed statistics, and
the checkpoint round trip."""

import numpy as np
import pytest
import torch

from dino_hf.objectives.balancing import KINDS, PhiS, Standardize, build_balancing, hadamard

# Widths of real teachers (ViT-S/B/L, SigLIP so400m, ViT-H, ViT-g) and tiny test widths.
WIDTHS = (32, 48, 64, 96, 192, 256, 384, 768, 1024, 1152, 1280, 1536)


def anisotropic(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """`(rows, dim)` features with distinct variances over two decades on random axes and a large mean."""
    rng = np.random.default_rng(seed)
    axes, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    spread = np.logspace(1, -1, dim)  # standard deviations along the axes
    return rng.normal(size=(rows, dim)) * spread @ axes.T + rng.normal(0, 5, dim)


def fitted(kind: str, features: np.ndarray, batches: int = 1) -> torch.nn.Module:
    balancing = build_balancing(kind, features.shape[1])
    for part in np.array_split(features, batches):
        balancing.observe(torch.from_numpy(part))
    return balancing.fit()


def numpy_phi_s(sample: np.ndarray):
    """PHI-S written independently: eigenvectors from the SVD of the centred sample, Sylvester's matrix by
    Kronecker products; the module's conventions (decreasing eigenvalues, largest entry positive)."""
    mean = sample.mean(0)
    _, singular, vt = np.linalg.svd(sample - mean, full_matrices=False)  # rows of vt: eigenvectors, decreasing
    eigenvalues = singular**2 / (len(sample) - 1)
    vt = vt * np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])[:, None]
    h = np.ones((1, 1))
    while len(h) < sample.shape[1]:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    h /= np.sqrt(len(h))
    return lambda x: (x - mean) @ (h @ vt).T / np.sqrt(eigenvalues.mean())


def test_phi_s_matches_an_independent_implementation_in_float64_and_float32():
    sample, fresh = anisotropic(2000, 64), anisotropic(300, 64, seed=1)
    reference = numpy_phi_s(sample)(fresh)
    balancing = fitted("phi_s", sample)
    out64 = balancing(torch.from_numpy(fresh))
    out32 = balancing(torch.from_numpy(fresh).float())
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    np.testing.assert_allclose(out64.numpy(), reference, atol=1e-6)
    np.testing.assert_allclose(out32.numpy(), reference, atol=1e-4)


def test_phi_s_standardises_every_dimension_with_one_scale_without_whitening():
    """PHI-S's guarantee: mean 0 and variance 1 in every dimension, by a rotation and one scale (distances
    shrink uniformly); the covariance keeps the spectrum lambda / mean(lambda), it is not the identity."""
    sample = anisotropic(2000, 48)  # 48 = Sylvester(4) x Paley I(12)
    balancing = fitted("phi_s", sample)
    y = balancing(torch.from_numpy(sample)).numpy()
    covariance = np.cov(y.T)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(np.diag(covariance), 1, atol=1e-9)
    eigenvalues = np.linalg.eigvalsh(np.cov(sample.T))
    np.testing.assert_allclose(np.linalg.eigvalsh(covariance), eigenvalues / eigenvalues.mean(), atol=1e-9)
    assert np.abs(covariance - np.eye(48)).max() > 0.1  # not whitened
    scale = np.sqrt(eigenvalues.mean())
    distances = np.linalg.norm(sample[:100] - sample[100:200], axis=1)
    mapped = np.linalg.norm(y[:100] - y[100:200], axis=1)
    np.testing.assert_allclose(mapped, distances / scale, rtol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_inverse_undoes_forward_on_any_leading_shape(kind):
    balancing = fitted(kind, anisotropic(1000, 96))
    x = torch.from_numpy(anisotropic(24, 96, seed=2)).float().view(2, 12, 96)  # patch tokens (B, P, D)
    y = balancing(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(balancing.inverse(y), x, atol=1e-5 * x.abs().max().item(), rtol=0)
    torch.testing.assert_close(y.view(-1, 96), balancing(x.view(-1, 96)))
    assert balancing(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("width", WIDTHS)
def test_hadamard_matrices_are_orthogonal_with_equal_magnitudes(width):
    h = hadamard(width)
    np.testing.assert_allclose((h @ h.T).numpy(), np.eye(width), atol=1e-12)
    np.testing.assert_allclose(h.abs().numpy(), 1 / np.sqrt(width), rtol=1e-12)


@pytest.mark.parametrize("width", [10, 100])
def test_a_width_without_hadamard_construction_is_refused_with_the_fix(width):
    """10: no Hadamard matrix exists (not a multiple of 4); 100: one exists, no construction here."""
    with pytest.raises(ValueError, match="standardize"):
        hadamard(width)
    with pytest.raises(ValueError, match="standardize"):
        build_balancing("phi_s", width)
    build_balancing("standardize", width)


def test_standardize_gives_mean_0_and_std_1_per_dimension_and_keeps_constant_dimensions_finite():
    sample = anisotropic(500, 32)
    sample[:, 3] = 7.0
    balancing = fitted("standardize", sample)
    y = balancing(torch.from_numpy(sample)).numpy()
    varying = np.arange(32) != 3
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(y.std(0, ddof=1)[varying], 1, atol=1e-9)
    np.testing.assert_array_equal(y[:, 3], 0)
    np.testing.assert_allclose(balancing.inverse(torch.from_numpy(y)).numpy(), sample, atol=1e-9)


def test_none_is_the_identity():
    x = torch.randn(5, 32)
    assert torch.equal(fitted("none", x.numpy().astype(np.float64))(x), x)


@pytest.mark.parametrize("kind", KINDS)
def test_observing_batches_equals_observing_their_concatenation(kind):
    sample = anisotropic(900, 64)
    streamed, whole = fitted(kind, sample, batches=3), fitted(kind, sample)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(streamed.state_dict()[name], value, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_all_reduced_statistics_are_those_of_every_process_batch(kind):
    """Two processes simulated in one: the other one's batch sums, captured through its own all_reduce,
    are what this process's all_reduce adds; the statistics are those of both batches."""
    mine, theirs = anisotropic(300, 32), anisotropic(200, 32, seed=3)
    captured = []
    build_balancing(kind, 32).observe(torch.from_numpy(theirs), all_reduce=lambda t: captured.append(t) or t)
    balancing = build_balancing(kind, 32)
    balancing.observe(torch.from_numpy(mine), all_reduce=lambda t: t + captured[0])
    both = build_balancing(kind, 32)
    both.observe(torch.from_numpy(np.concatenate([mine, theirs])))
    assert balancing.count.item() == 500
    for name, value in both.state_dict().items():
        torch.testing.assert_close(balancing.state_dict()[name], value, rtol=1e-12, atol=1e-9, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_restores_the_fitted_map_bit_for_bit(kind):
    balancing = fitted(kind, anisotropic(500, 64), batches=2)
    state = balancing.state_dict()
    assert state["fitted"].item() and all(v.dtype == torch.float64 for k, v in state.items() if k != "fitted")
    restored = build_balancing(kind, 64)
    restored.load_state_dict(state)
    x = torch.randn(3, 7, 64)
    assert torch.equal(restored(x), balancing(x))
    assert all(torch.equal(restored.state_dict()[name], value) for name, value in state.items())


@pytest.mark.parametrize("kind", KINDS)
def test_forward_before_fit_and_observe_after_fit_are_refused(kind):
    balancing = build_balancing(kind, 32)
    with pytest.raises(RuntimeError, match="before fit"):
        balancing(torch.zeros(2, 32))
    with pytest.raises(RuntimeError, match="at least 2"):
        balancing.fit()
    balancing.observe(torch.randn(10, 32))
    balancing.fit()
    with pytest.raises(RuntimeError, match="frozen"):
        balancing.observe(torch.randn(10, 32))
    with pytest.raises(ValueError, match="dim=48"):
        balancing(torch.zeros(2, 48))


def test_build_balancing_refuses_an_unknown_kind_and_builds_the_known_ones():
    with pytest.raises(ValueError, match="'phi_s', 'standardize', 'none'"):
        build_balancing("whiten", 32)
    assert isinstance(build_balancing("phi_s", 32), PhiS)
    assert isinstance(build_balancing("standardize", 32), Standardize)


def test_phi_s_is_not_fitted_on_non_finite_features():
    balancing = build_balancing("phi_s", 32)
    balancing.observe(torch.full((4, 32), float("nan")))
    with pytest.raises(RuntimeError, match="NaN"):
        balancing.fit()
