"""Data-aware truncation: the SVD that minimises the error on the layer's actual inputs.

For y = x W with inputs X [m, k] and Gram matrix C = X^T X = R R^T,

    ||X (W - W_r)||_F^2 = tr((W - W_r)^T C (W - W_r)) = ||R^T W - R^T W_r||_F^2,

so the best rank-r W_r (on these inputs) is R^{-T} (R^T W)_r, the truncated SVD of the whitened
weight mapped back (SVD-LLM's truncation-aware whitening). The singular values of R^T W then give
the activation-weighted error of every rank at once, exactly as a weight's own singular values
give its Frobenius error (Eckart-Young).

R is the Cholesky factor of the regularised Gram. Real activations are often rank-deficient (dead
units, constant features, fewer rows than features), where Cholesky fails even after
regularisation in float64 rounding; the fallback is the eigendecomposition with its eigenvalues
clamped to the same floor, which never fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .svd import relative_error_by_rank, single_threaded_blas

#: Ridge added to the Gram, relative to its mean eigenvalue trace(C) / k. Large enough to keep the
#: whitened problem well-conditioned in float64, small enough not to change which directions the
#: inputs use: directions whose energy is below it are treated as unused, which they are to the
#: float32 arithmetic the model runs in.
RIDGE = 1e-6


def regularized_gram(gram: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    c = np.asarray(gram, dtype=np.float64)
    c = (c + c.T) / 2   # a streamed float sum is symmetric only up to rounding
    k = c.shape[0]
    return c + ridge_floor(float(np.trace(c)), k, ridge) * np.eye(k)


def ridge_floor(trace: float, k: int, ridge: float = RIDGE) -> float:
    """The ridge added to a Gram of trace `trace` over k features: `ridge` x its mean eigenvalue."""
    scale = trace / k if k else 0.0
    return ridge * scale if scale > 0 else ridge


@dataclass(frozen=True)
class OutputGram:
    """What a tall weight's whitened SVD needs of its inputs X [m, k], taken at its outputs
    Y = X W [m, n], n < k: Y^T Y = W^T C W (n x n), and trace(C) for the ridge. A k x k Gram of
    the inputs would cost (k / n)^2 more to accumulate and hold: BERT's FFN down-projections
    (3072 -> 768) took 0.9 of its 1.03 GB of Grams and most of the time spent forming them."""

    gram: np.ndarray
    input_trace: float
    inputs: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.gram.shape

    def __add__(self, other: "OutputGram") -> "OutputGram":
        """The Gram of two layers' rows together (layers that read one weight)."""
        return OutputGram(self.gram + other.gram, self.input_trace + other.input_trace, self.inputs)

    def __radd__(self, other) -> "OutputGram":
        return self if isinstance(other, int) and other == 0 else NotImplemented


@dataclass(frozen=True)
class Whitening:
    """root R with R R^T = C (regularised), and how it was obtained ("cholesky" or "eigh")."""

    root: np.ndarray
    method: str

    def unwhiten(self, m: np.ndarray) -> np.ndarray:
        """R^{-T} m: maps a whitened-space matrix back to weight space."""
        if self.method == "cholesky":
            return np.linalg.solve(self.root.T, m)
        # eigh root R = Q diag(sqrt(lambda)): R^{-T} = Q diag(1 / sqrt(lambda))
        q_scaled = self.root / np.sum(self.root ** 2, axis=0, keepdims=True)
        return q_scaled @ m


#: Smallest eigenvalue kept, relative to the largest diagonal entry of the Gram, whatever the
#: ridge: below it, float64 rounding of the Gram is larger than the direction's energy, and
#: unwhitening by 1 / sqrt(eigenvalue) would amplify that rounding without bound.
EIGEN_FLOOR = 1e-12


def whitening(gram: np.ndarray, ridge: float = RIDGE) -> Whitening:
    c = regularized_gram(gram, ridge)
    k = c.shape[0]
    top = float(np.max(np.diag(c))) if k else 0.0
    floor = max(ridge * np.trace(c) / k if k else 0.0, EIGEN_FLOOR * top, np.finfo(np.float64).tiny)
    with single_threaded_blas():
        try:
            root = np.linalg.cholesky(c)
            # Cholesky of a singular matrix can "succeed" on rounding-sized pivots
            if k == 0 or np.min(np.diag(root)) ** 2 >= floor:
                return Whitening(root, "cholesky")
        except np.linalg.LinAlgError:
            pass
        eigvals, eigvecs = np.linalg.eigh(c)
    return Whitening(eigvecs * np.sqrt(np.maximum(eigvals, floor)), "eigh")


@dataclass(frozen=True)
class WhitenedSVD:
    """R^T W = U diag(s) V^T: s are the activation-weighted singular values of W, found from the
    eigenvalues of the smaller of the two Grams of R^T W, with the vectors of that side only:

    - n <= k (`basis` = V [n, m]): (R^T W)^T R^T W = W^T C W is the Gram of the layer's outputs, so
      no root of C is needed at all, and the truncation is W V_r V_r^T (the outputs projected on
      their top r directions);
    - k < n (`basis` = R^{-T} U [k, m], `dual` = R U, basis^T dual = I): the truncation is
      R^{-T} U_r U_r^T R^T W = basis_r dual_r^T W, with the k x k root R of C.

    Either way the factors are formed from W (`weight`, read again when a truncation is asked for)
    and an m x m or k x m basis, so neither the k x k root nor the k x n left vectors are kept
    (BERT-base: 1 GB of float64 vectors for the 72 layers against 0.3 GB of bases), and no thin
    SVD runs (768x3072: eigh of the 768 side takes 0.2 s where the SVD took 1.5 s). Squaring
    loses the relative accuracy of singular values below sqrt(eps) of the largest; their share of
    every error is below eps, so no rank choice can tell."""

    s: np.ndarray
    basis: np.ndarray
    dual: np.ndarray | None
    weight: Callable[[], np.ndarray]
    method: str       # "outputs" (n <= k), or how C was factored: "cholesky", "eigh" after a Cholesky failure

    def relative_errors(self) -> np.ndarray:
        """err[r] = ||X W - X W_r||_F / ||X W||_F for r = 0..len(s), on the regularised Gram."""
        return relative_error_by_rank(self.s)

    def truncated(self, max_rank: int) -> "WhitenedSVD":
        """The same, kept to give truncations up to max_rank only, as the caches hold it: the basis
        vectors past the largest rank that pays are never used (768 x 768 at break-even: half of
        them), and the kept ones are stored in float32, the precision the factors are written in
        (the singular values, which rank the truncations, stay float64)."""
        keep = lambda m: None if m is None else np.ascontiguousarray(m[:, :max_rank], dtype=np.float32)  # noqa: E731
        return WhitenedSVD(self.s, keep(self.basis), keep(self.dual), self.weight, self.method)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """W ~= a [k, rank] @ b [rank, n], the truncation that is best on the calibration inputs.

        The singular values are split evenly in the whitened space, so both factors keep norms of
        the same order, as the plain SVD's do. A zero singular value's direction carries nothing
        (X W v = 0), so dividing by 1 there leaves the zero that is the product."""
        if rank > self.basis.shape[1]:
            raise ValueError(f"rank {rank} > the {self.basis.shape[1]} basis vectors kept")
        root = np.sqrt(self.s[:rank])
        safe = np.where(root > 0, root, 1.0)
        w = np.asarray(self.weight(), dtype=np.float64)
        with single_threaded_blas():
            if self.dual is None:
                v = self.basis[:, :rank].astype(np.float64)
                return (w @ v) / safe, root[:, None] * v.T
            return (self.basis[:, :rank].astype(np.float64) * root,
                    (self.dual[:, :rank].astype(np.float64).T @ w) / safe[:, None])


def whitened_svd(w: np.ndarray, gram: "np.ndarray | OutputGram", ridge: float = RIDGE,
                 weight: Callable[[], np.ndarray] | None = None) -> WhitenedSVD:
    """w [k, n] as applied (y = x w); gram [k, k] = X^T X of the inputs x, or for n < k their
    OutputGram. `weight` reads w again when a truncation is asked for; without it the result keeps
    w (the caller's array, in its own dtype: no float64 copy is kept)."""
    w64 = np.asarray(w, dtype=np.float64)
    k, n = w64.shape
    weight = weight or (lambda: w)
    if isinstance(gram, OutputGram):
        if gram.shape != (n, n) or gram.inputs != k:
            raise ValueError(f"outputs' Gram {gram.shape} of {gram.inputs} inputs does not match weight {w64.shape}")
        floor = ridge_floor(gram.input_trace, k, ridge)
        with single_threaded_blas():
            s, v = _descending_eigh(np.asarray(gram.gram, dtype=np.float64) + floor * (w64.T @ w64))
        return WhitenedSVD(s, v, None, weight, "outputs")
    if gram.shape != (k, k):
        raise ValueError(f"Gram matrix {gram.shape} does not match weight {w64.shape} (expected k x k, k = rows)")
    if n <= k:
        c = regularized_gram(gram, ridge)
        with single_threaded_blas():
            s, v = _descending_eigh(w64.T @ (c @ w64))
        return WhitenedSVD(s, v, None, weight, "outputs")
    white = whitening(gram, ridge)
    with single_threaded_blas():
        m = white.root.T @ w64
        s, u = _descending_eigh(m @ m.T)
        return WhitenedSVD(s, white.unwhiten(u), white.root @ u, weight, white.method)


def _descending_eigh(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The singular values (descending) and vectors of a matrix from its Gram: the square roots of
    the eigenvalues, a rounding-sized negative one read as 0."""
    energy, vectors = np.linalg.eigh((gram + gram.T) / 2)
    return np.sqrt(np.maximum(energy[::-1], 0.0)), np.ascontiguousarray(vectors[:, ::-1])


def asvd_scaling(gram: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """ASVD's per-input-channel scale, mean(x_j^2)^(alpha / 2) up to a constant: the diagonal of
    the Gram only, so it is cheap where a full whitening is not (k in the tens of thousands)."""
    energy = np.maximum(np.diag(np.asarray(gram, dtype=np.float64)), 0.0)
    scale = energy ** (alpha / 2)
    positive = scale[scale > 0]
    floor = positive.min() if positive.size else 1.0
    return np.where(scale > 0, scale, floor)


def asvd_gram(gram: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The diagonal Gram whose whitening is ASVD's scaling: whitened_svd(w, asvd_gram(c)) is ASVD."""
    return np.diag(asvd_scaling(gram, alpha) ** 2)


def activation_error(gram: np.ndarray, w: np.ndarray, approx: np.ndarray) -> float:
    """||X w - X approx||_F / ||X w||_F from the Gram alone: tr(D^T C D) / tr(W^T C W)."""
    c = np.asarray(gram, dtype=np.float64)
    w64 = np.asarray(w, dtype=np.float64)
    d = w64 - np.asarray(approx, dtype=np.float64)
    total = float(np.sum(w64 * (c @ w64)))
    if total <= 0.0:
        return 0.0
    return float(np.sqrt(max(float(np.sum(d * (c @ d))), 0.0) / total))


#: Pull of the corrected weight toward the original, relative to the mean eigenvalue of C~. The
#: correction fits k x n numbers on the calibration rows; with a few thousand rows and k in the
#: thousands a plain least-squares fit learns the calibration texts, not the layer (measured on
#: MiniLM: embedding cosine on unseen texts fell from 0.915 to 0.872 without it).
SHRINKAGE = 0.1


def corrected_weight(w: np.ndarray, gram: np.ndarray, cross: np.ndarray, shrinkage: float = SHRINKAGE,
                     prior: np.ndarray | None = None) -> np.ndarray:
    """The weight that best maps the inputs a layer really sees to the output it should give,

        argmin_V ||X~ V - X w||_F^2 + lam ||V - V0||_F^2 = (C~ + lam I)^{-1} (X~^T X w + lam V0),

    with C~ = X~^T X~ (gram), X~^T X (cross), lam = shrinkage x trace(C~) / k, and V0 = w unless a
    `prior` is given (when X~ lives in another space than X, e.g. a conv's reduced channels). X~
    are the layer's inputs once the layers before it are truncated, X the original inputs. Then
    ||X~ W_r - X w||^2 = ||X~ (W_r - V)||^2 + const (for lam -> 0), so the whitened SVD of V with
    C~ is the rank-r weight that undoes upstream error as well as the layer can: reduced-rank
    regression, both factors at once in closed form (what alternating least squares over the two
    factors converges to)."""
    c = np.asarray(gram, dtype=np.float64)
    c = (c + c.T) / 2
    k = c.shape[0]
    lam = shrinkage * np.trace(c) / k if k and np.trace(c) > 0 else shrinkage
    w64 = np.asarray(w, dtype=np.float64)
    v0 = w64 if prior is None else np.asarray(prior, dtype=np.float64)
    with single_threaded_blas():
        return np.linalg.solve(c + lam * np.eye(k), np.asarray(cross, dtype=np.float64) @ w64 + lam * v0)
