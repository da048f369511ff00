"""Balancing of a teacher's features before multi-teacher distillation (`build_balancing(kind, dim)`).

Teachers of an agglomerative student (AM-RADIO, UNIC, Theia) have features of very different scales:
regressed raw, the teacher with the largest activations takes the loss. Each teacher's features therefore
go through a fixed, invertible map fitted on its own statistics, and the student's head for that teacher
learns the balanced features (`inverse` maps a prediction back to the teacher's space):

- `"phi_s"`, `PhiS` (Ranzinger et al. 2024, "PHI-S: Distribution Balancing for Label-Free Multi-Teacher
  Distillation", Sec. 2; NVlabs/RADIO `examples/common/phi_s.py`): with the mean mu and the covariance
  C = U diag(lambda) U^T of the features, y = H U^T (x - mu) / sqrt(mean(lambda)), H a normalised Hadamard
  matrix. It is a rotation and one scale for every dimension: the features are not distorted (distances
  shrink by the same factor everywhere) and yet every output dimension has mean 0 and variance exactly 1,
  because the rotated covariance H diag(lambda) H^T has the diagonal mean(lambda) (each |H_ij|^2 = 1 / d).
  It is not whitening: the output covariance is H diag(lambda / mean(lambda)) H^T, not the identity.
  In the paper, the best student among the standardisations and whitenings it compares.
- `"standardize"`, `Standardize`: y = (x - mu) / sigma per dimension, the baseline of Theia (Shang et al.
  2024, dataset statistics of each teacher) and UNIC (Sariyildiz et al. 2024, running statistics updated
  by an EMA whose momentum goes 1 -> 0.001; here they are fitted once like PHI-S). A dimension's sigma is
  at least `MIN_STD`, so that constant dimensions stay finite.
- `"none"`, `Identity`: the raw features.

All three are fitted the same way, on the first batches of the run: `observe` adds each batch's sums to
float64 buffers (count, sum, and the sum of outer products or of squares), `fit` freezes the map, and from
then on `forward` / `inverse` apply it to any `(..., D)` tensor. The sums and the fitted map are buffers
(float64) of the state dict: a checkpoint restores them bit for bit, and a fitted map never changes when
resumed on another device. Keep a balancing out of a module that is cast to another dtype (`.half()`),
which would round them.

Distributed runs pass `all_reduce` to `observe`: a callable returning the sum over processes of a
float64 tensor (`functools.partial(accelerator.reduce, reduction="sum")`); each batch's sums are reduced
before they are added, so every process holds the same statistics and fits the same map.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

# Smallest sigma of `Standardize` (UNIC adds 1e-6 to its std): a constant dimension maps to 0, not NaN.
MIN_STD = 1e-6


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % k for k in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """The Jacobsthal matrix of the prime q: Q_ij = chi(j - i), chi the quadratic character mod q."""
    squares = {k * k % q for k in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index[None, :] - index[:, None]) % q]  # (q, q)


def _bordered(q: int, first_column_sign: float) -> torch.Tensor:
    """[[0, 1^T], [s 1, Q]] of order q + 1 (s = -1: Paley I's skew core, s = 1: Paley II's symmetric one)."""
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:] = 1
    core[1:, 0] = first_column_sign
    core[1:, 1:] = _jacobsthal(q)
    return core


def _paley(order: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of `order` (entries +-1), or None when neither construction applies:
    Paley I, order q + 1 for a prime q = 3 mod 4: I + [[0, 1^T], [-1, Q]];
    Paley II, order 2 (q + 1) for a prime q = 1 mod 4: each 0 of [[0, 1^T], [1, Q]] replaced by
    [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]].
    Prime powers would need finite-field arithmetic; no width of a known teacher needs them."""
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        return torch.eye(order, dtype=torch.float64) + _bordered(q, -1.0)
    q = order // 2 - 1
    if order % 2 == 0 and _is_prime(q) and q % 4 == 1:
        ones = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zeros = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(_bordered(q, 1.0), ones) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zeros)
    return None


def _sylvester(order: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of a power of two: H_2n = [[H_n, H_n], [H_n, -H_n]]."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while len(matrix) < order:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def hadamard(dim: int) -> torch.Tensor:
    """A normalised Hadamard matrix of order `dim` (H H^T = I, every |H_ij| = 1 / sqrt(dim)), float64.

    Built as RADIO builds them (`examples/common/hadamard.py`): Sylvester's for a power of two, otherwise
    the Kronecker product of Sylvester's of the largest power of two 2^k for which dim / 2^k has a Paley
    matrix (I or II, see `_paley`). Covers 12 * 2^k (384, 768, 1536, 48, 96, 192), 20 * 2^k (1280),
    36 * 2^k (1152), 28 * 2^k and every power of two; the Paley factor is checked (exactly) to be
    orthogonal. Where RADIO falls back to a random orthogonal matrix (`allow_approx`), whose rows do not have
    equal magnitudes and so do not equalise the variances, this refuses the width.

    Raises:
        ValueError: for a width without a Hadamard matrix (not 1, 2 or a multiple of 4) or without a
            construction here (100, for one); the message says to standardise that teacher instead.
    """
    if dim < 1 or (dim > 2 and dim % 4):
        raise ValueError(
            f"no Hadamard matrix of order {dim} exists (orders are 1, 2 and multiples of 4), so PHI-S cannot "
            f"balance features of width {dim}; use the balancing 'standardize' for this teacher"
        )
    twos = (dim & -dim).bit_length() - 1  # dim = 2^twos * odd
    for power in range(twos, -1, -1):
        block = _sylvester(1) if dim == 1 << power else _paley(dim >> power)
        if block is not None:
            break
    else:
        raise ValueError(
            f"no Hadamard matrix construction for width {dim}: Sylvester 2^k, Paley I (q + 1, q prime = 3 mod 4) "
            f"and Paley II (2 (q + 1), q prime = 1 mod 4), times 2^k, do not reach it; use the balancing "
            f"'standardize' for this teacher"
        )
    # Exact (integer entries); Sylvester's factor and the Kronecker product keep orthogonality.
    if not torch.equal(block @ block.T, len(block) * torch.eye(len(block), dtype=torch.float64)):
        raise AssertionError(f"the Paley construction of order {len(block)} is not orthogonal")
    return torch.kron(_sylvester(1 << power), block) / math.sqrt(dim)


class Balancing(nn.Module):
    """What the three balancings share: the streaming sums, `observe`, `fit`, and the checks of `forward` /
    `inverse`. A subclass names its sums (`_sums_of`) and its map (`_fit`, `_forward`, `_inverse`).

    Args:
        dim: the teacher's feature width D.
    """

    kind: str

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        for name, shape in self._sum_shapes().items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("fitted", torch.tensor(False))
        self._fitted = False  # mirrors `fitted` on the host, so that a step reads nothing from the device

    def _sum_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def _sums_of(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The sums of one batch of `rows (N, D)` (float64), under the names of `_sum_shapes`."""
        return {}

    def _check_width(self, features: torch.Tensor, what: str) -> None:
        if features.shape[-1] != self.dim:
            raise ValueError(
                f"{what} takes features (..., {self.dim}) of this teacher's width, got {tuple(features.shape)}; "
                f"build the balancing with dim={features.shape[-1]} for this teacher"
            )

    @torch.no_grad()
    def observe(self, features: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Adds the rows of `features (..., D)` to the statistics, in float64.

        Args:
            features: a batch of the teacher's features: global `(B, D)` or patch tokens `(B, P, D)`.
            all_reduce: returns the sum over processes of a tensor (None in one process); called once, on
                the batch's sums flattened into one float64 vector.
        """
        if self._fitted:
            raise RuntimeError(
                f"this {type(self).__name__} balancing is fitted and its statistics frozen; observe the first "
                "batches before fit(), and build a new balancing to fit it again"
            )
        self._check_width(features, "observe")
        rows = features.detach().reshape(-1, self.dim).to(torch.float64)  # (N, D): patch tokens become B * P rows
        sums = {"count": torch.tensor(float(len(rows)), dtype=torch.float64, device=rows.device)}
        sums.update(self._sums_of(rows))
        if all_reduce is not None:
            flat = all_reduce(torch.cat([value.reshape(-1) for value in sums.values()]))
            parts = flat.split([value.numel() for value in sums.values()])
            sums = {name: part.view_as(value) for (name, value), part in zip(sums.items(), parts)}
        for name, value in sums.items():
            getattr(self, name).add_(value.to(getattr(self, name).device))

    @torch.no_grad()
    def fit(self) -> "Balancing":
        """Freezes the map from the statistics observed (float64); reads them on the host, once."""
        if self._fitted:
            raise RuntimeError(f"this {type(self).__name__} balancing is already fitted")
        count = int(self.count)
        if count < 2:
            raise RuntimeError(
                f"fit() needs at least 2 observed feature rows, got {count}; call observe(features) on the "
                "first batches of the run before fit()"
            )
        sums = [getattr(self, name) for name in self._sum_shapes()]
        if not all(torch.isfinite(value).all() for value in sums):
            raise RuntimeError(
                "the observed features hold NaN or infinite values; check the teacher's output (its input "
                "normalisation, its precision) before fitting the balancing"
            )
        self._fit(count)
        self.fitted.fill_(True)
        self._fitted = True
        return self

    def _fit(self, count: int) -> None:
        pass

    def _check(self, x: torch.Tensor, what: str) -> None:
        if not self._fitted:
            raise RuntimeError(
                f"{type(self).__name__}.{what} called before fit(); observe(features) the first batches, then "
                "call fit() once, before the balanced features are used"
            )
        self._check_width(x, what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x (..., D)` teacher features -> the balanced features `(..., D)`, in x's dtype (computed in at
        least float32, autocast off)."""
        self._check(x, "forward")
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._forward(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """`y (..., D)` balanced features (the student's prediction) -> the teacher's space `(..., D)`."""
        self._check(y, "inverse")
        with torch.autocast(device_type=y.device.type, enabled=False):
            return self._inverse(y.to(torch.promote_types(y.dtype, torch.float32))).to(y.dtype)

    @torch.no_grad()
    def inverse_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse as the affine map it is, `x = y W^T + b` (float64): `W (D, D)`, `b (D,)`; what an export
        keeps, so that the balanced space maps back to the teacher's without this module."""
        device = self.fitted.device
        bias = self.inverse(torch.zeros(1, self.dim, dtype=torch.float64, device=device))  # (1, D)
        images = self.inverse(torch.eye(self.dim, dtype=torch.float64, device=device))  # (D, D): row j is W[:, j] + b
        return (images - bias).T, bias[0]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fitted = bool(self.fitted)  # once, at resume

    def extra_repr(self) -> str:
        return f"dim={self.dim}, fitted={self._fitted}"


class Identity(Balancing):
    """The balancing `"none"`: the raw features (still observed and fitted, like the others)."""

    kind = "none"


class Standardize(Balancing):
    """Per-dimension standardisation y = (x - mu) / sigma (Theia, UNIC); sigma is the unbiased standard
    deviation of the observed rows, at least `MIN_STD`. Buffers: the sums `sum`, `sum_squares`; the map
    `mean`, `std` `(D,)`."""

    kind = "standardize"

    def __init__(self, dim: int):
        super().__init__(dim)
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("std", torch.ones(dim, dtype=torch.float64))

    def _sum_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"sum": (self.dim,), "sum_squares": (self.dim,)}

    def _sums_of(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": rows.sum(0), "sum_squares": rows.square().sum(0)}

    def _fit(self, count: int) -> None:
        mean = self.sum / count
        variance = (self.sum_squares - count * mean.square()).clamp_min(0) / (count - 1)
        self.mean.copy_(mean)
        self.std.copy_(variance.sqrt().clamp_min(MIN_STD))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std.to(y.dtype) + self.mean.to(y.dtype)


class PhiS(Balancing):
    """PHI-S (see the module's docstring): y = R (x - mu) / scale with the rotation R = H U^T and
    scale = sqrt(mean(lambda)); inverse x = R^T y * scale + mu.

    The covariance is the unbiased one of the observed rows (as `torch.cov` in RADIO's `get_phi_s_matrix`),
    its negative eigenvalues (rounding) are taken as 0. So that the map is a function of the statistics alone,
    the eigenvectors are ordered by decreasing eigenvalue and each signed so that its entry of largest
    magnitude is positive. Buffers: the sums `sum (D,)`, `sum_outer (D, D)`; the map `mean (D,)`,
    `rotation (D, D)`, `scale ()`.

    Raises:
        ValueError: at construction, for a width without a Hadamard matrix (see `hadamard`).
    """

    kind = "phi_s"

    def __init__(self, dim: int):
        hadamard(dim)  # refuses an unsupported width now, not after the first batches
        super().__init__(dim)
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("rotation", torch.eye(dim, dtype=torch.float64))
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))

    def _sum_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"sum": (self.dim,), "sum_outer": (self.dim, self.dim)}

    def _sums_of(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": rows.sum(0), "sum_outer": rows.T @ rows}

    def _fit(self, count: int) -> None:
        mean = self.sum / count
        covariance = (self.sum_outer - count * torch.outer(mean, mean)) / (count - 1)  # (D, D)
        covariance = (covariance + covariance.T) / 2
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending; columns are eigenvectors
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        largest = eigenvectors.abs().argmax(0, keepdim=True)  # (1, D)
        eigenvectors = eigenvectors * eigenvectors.gather(0, largest).sign()
        scale = eigenvalues.mean().sqrt()
        if not scale > 0:
            raise RuntimeError("the observed features are constant (zero variance); PHI-S cannot scale them")
        self.mean.copy_(mean)
        self.rotation.copy_(hadamard(self.dim).to(eigenvectors.device) @ eigenvectors.T)
        self.scale.copy_(scale)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) @ self.rotation.T.to(x.dtype) / self.scale.to(x.dtype)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y * self.scale.to(y.dtype)) @ self.rotation.to(y.dtype) + self.mean.to(y.dtype)


BALANCINGS = {cls.kind: cls for cls in (PhiS, Standardize, Identity)}
KINDS = tuple(BALANCINGS)


def build_balancing(kind: str, dim: int) -> Balancing:
    """The balancing `kind` ("phi_s", "standardize" or "none") of a teacher of width `dim`, unfitted."""
    if kind not in BALANCINGS:
        raise ValueError(f"balancing {kind!r} is unknown; use one of {', '.join(map(repr, KINDS))}")
    return BALANCINGS[kind](dim)


__all__ = ["KINDS", "Balancing", "Identity", "PhiS", "Standardize", "build_balancing", "hadamard"]
