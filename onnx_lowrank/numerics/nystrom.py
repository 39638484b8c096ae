"""Module-level low rank for an MLP block: keep k of its intermediate neurons and refit the second
matrix (the Nyström / CR form MoDeGPT uses for FFNs).

    y = act(x W1 + b1) W2 + b2 = A W2 + b2          A [m, d]: the activations, d neurons
      ->  y ~= A_S W2' + b2'                         S: k kept neurons, W2' [k, n]

A_S is exact (the kept columns of W1 and entries of b1 compute it), so the only error is the
least-squares fit of A W2 + b2 by A_S and a constant column. Everything is read from the
augmented Gram of the activations, H = [A 1]^T [A 1] = [[G, s], [s^T, m]] (G = A^T A, s the
column sums, m the rows), with the bias as one more row of the target weight V = [W2; b2^T]:

    V'_S = H[S, S]^-1 H[S, :] V        (S with the constant column, which is always kept)
    ||[A 1] V - [A 1]_S V'_S||^2 = tr(V^T H V) - tr(V^T H[:, S] H[S, S]^-1 H[S, :] V)

The second term grows by one pivot of a Cholesky factorization of H in the order the neurons are
kept, so one factorization gives the error of every k at once (`nested_errors`). The order is the
selection: by energy (activation energy G[i, i] x ||W2[i]||^2), greedily by the largest error
drop at each step (a pivoted Cholesky whose pivot is the column that explains most of the
remaining output), or by ridge leverage scores of G (which ignore W2).

Errors are relative to ||A W2||, the norm the whitened SVD of W2 measures its error against, so
the two forms of a block compare on one scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .svd import single_threaded_blas

SELECTIONS = ("greedy", "energy", "leverage")

#: Ridge on the Gram relative to its mean diagonal (numerics.whitening's): dead neurons (ReLU
#: units that never fire, all-zero columns) make G singular, and the refit must stay solvable.
RIDGE = 1e-6


@dataclass(frozen=True)
class NeuronSelection:
    """Neurons in the order they are kept (`order`, best first) and the relative output error of
    keeping the first k of them, errors[k] for k = 0..d (errors[d] ~ 0)."""

    order: np.ndarray
    errors: np.ndarray
    method: str

    def kept(self, k: int) -> np.ndarray:
        """The first k neurons, ascending (the kept columns keep their order in the graph)."""
        return np.sort(self.order[:k])


def augmented_gram(gram: np.ndarray, sums: np.ndarray | None, rows: float) -> np.ndarray:
    """H = [A 1]^T [A 1] from G = A^T A, s = A^T 1 and the row count m; G alone without sums (a
    block with no bias to refit: no constant column)."""
    d = gram.shape[0]
    g = (np.asarray(gram, np.float64) + np.asarray(gram, np.float64).T) / 2
    if sums is None:
        return g
    h = np.empty((d + 1, d + 1))
    h[:d, :d] = g
    h[:d, d] = h[d, :d] = sums
    h[d, d] = rows
    return h


def _regularized(h: np.ndarray, d: int, ridge: float) -> np.ndarray:
    scale = np.trace(h[:d, :d]) / d if d else 0.0
    out = h.copy()
    out[np.arange(d), np.arange(d)] += ridge * scale if scale > 0 else ridge
    return out


def _target(w2: np.ndarray, bias: np.ndarray | None, constant: bool) -> np.ndarray:
    """V = [W2; b2^T] [d + 1, n] (W2 alone without the constant column)."""
    w2 = np.asarray(w2, dtype=np.float64)
    if not constant:
        return w2
    b = np.zeros(w2.shape[1]) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), (w2.shape[1],))
    return np.vstack([w2, b[None, :]])


def _reference_energy(h: np.ndarray, v: np.ndarray, d: int) -> float:
    """||A W2||^2: the norm relative errors are taken against."""
    w2 = v[:d]
    return float(np.sum(w2 * (h[:d, :d] @ w2)))


@dataclass(frozen=True)
class _Problem:
    """H as measured (`exact`: the cross terms and the output energy) and regularised (`solve`:
    what the fits invert), the target V, and d."""

    exact: np.ndarray
    solve: np.ndarray
    v: np.ndarray
    d: int

    @property
    def constant(self) -> bool:
        return self.exact.shape[0] > self.d

    @property
    def total(self) -> float:
        return float(np.sum(self.v * (self.exact @ self.v)))

    @property
    def reference(self) -> float:
        return _reference_energy(self.exact, self.v, self.d)


def _problem(gram, sums, rows, w2, bias, ridge) -> _Problem:
    d = np.asarray(gram).shape[0]
    exact = augmented_gram(gram, None if sums is None else np.asarray(sums, np.float64), float(rows))
    return _Problem(exact, _regularized(exact, d, ridge), _target(w2, bias, sums is not None), d)


def select_neurons(gram: np.ndarray, sums: np.ndarray, rows: float, w2: np.ndarray, bias: np.ndarray | None = None,
                   method: str = "greedy", ridge: float = RIDGE) -> NeuronSelection:
    """The order to keep neurons in by `method`, and the error of every k."""
    if method not in SELECTIONS:
        raise ValueError(f"method must be one of {SELECTIONS}, got {method!r}")
    problem = _problem(gram, sums, rows, w2, bias, ridge)
    with single_threaded_blas():
        if method == "greedy":
            order, errors = _greedy(problem)
            return NeuronSelection(order, errors, method)
        if method == "energy":
            order = energy_order(problem.exact, problem.v, problem.d)
        else:
            order = leverage_order(problem.exact, problem.d)
        return NeuronSelection(order, nested_errors(problem, order), method)


def energy_order(h: np.ndarray, v: np.ndarray, d: int) -> np.ndarray:
    """Neurons by G[i, i] x ||W2[i]||^2, largest first: the energy neuron i carries to the output."""
    score = np.diag(h)[:d] * np.sum(v[:d] ** 2, axis=1)
    return np.argsort(-score, kind="stable")


def leverage_order(h: np.ndarray, d: int, k: int | None = None) -> np.ndarray:
    """Neurons by ridge leverage diag(G (G + l I)^-1), largest first, with l the mean of the
    eigenvalues past k (default d / 2) as Cohen et al. choose it."""
    g = h[:d, :d]
    eig, vec = np.linalg.eigh(g)
    eig = np.maximum(eig[::-1], 0.0)
    vec = vec[:, ::-1]
    k = d // 2 if k is None else k
    lam = max(float(np.sum(eig[k:])) / max(k, 1), np.finfo(np.float64).tiny)
    score = np.sum(vec ** 2 * (eig / (eig + lam))[None, :], axis=1)
    return np.argsort(-score, kind="stable")


def nested_errors(problem: "_Problem", order: np.ndarray) -> np.ndarray:
    """errors[k] = relative LS error of keeping order[:k] (and the constant column), k = 0..d:
    H permuted to (constant, order) = L L^T, then the fit of the first j columns explains
    ||(L^-1 P H V)[:j]||^2 of the output, one row of the triangular solve per column."""
    d = problem.d
    perm = np.concatenate([[d] if problem.constant else [], np.asarray(order)]).astype(np.int64)
    lower = _cholesky(problem.solve[np.ix_(perm, perm)], d)
    z = _forward_solve(lower, problem.exact[perm] @ problem.v)
    explained = np.cumsum(np.sum(z ** 2, axis=1))      # constant (if any), then each neuron
    if not problem.constant:
        explained = np.concatenate([[0.0], explained])
    return _relative(problem.total - explained, problem.reference)


def _cholesky(h: np.ndarray, d: int) -> np.ndarray:
    """Cholesky of the regularised H; where float rounding leaves it indefinite, with the ridge
    raised tenfold at a time (the fit stays the least-squares one up to that ridge)."""
    ridge = RIDGE
    while True:
        try:
            return np.linalg.cholesky(h)
        except np.linalg.LinAlgError:
            if ridge > 1e-2:
                raise
            h = _regularized(h, d, ridge * 9)
            ridge *= 10


def _forward_solve(lower: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        from scipy.linalg import solve_triangular
        return solve_triangular(lower, b, lower=True, check_finite=False)
    except ImportError:   # numpy alone: a dense solve of the triangular system is exact too
        return np.linalg.solve(lower, b)


def _relative(residual: np.ndarray, reference: float) -> np.ndarray:
    return np.sqrt(np.maximum(residual, 0.0) / reference) if reference > 0 else np.zeros_like(residual)


#: Pivots between full updates of the residual cross term in the greedy selection: within a block
#: its row norms are updated by matrix-vector products, at the end of one by one matrix product
#: (BLAS-3), which took MiniLM's 1536-neuron FFNs from ~10 s to ~2 s a layer.
GREEDY_BLOCK = 32


def _greedy(problem: "_Problem") -> tuple[np.ndarray, np.ndarray]:
    """Forward selection on the Gram alone: a pivoted Cholesky of H whose pivot at each step is the
    neuron whose residual column explains most of the residual output, ||C[i]||^2 / D[i] with
    D = diag of the Schur complement and C = (Schur complement) V. The constant column goes first.

    C after pivot p is C - l c^T (l the new Cholesky column, c = C[p] / l[p]); C itself is only
    brought up to date every GREEDY_BLOCK pivots, its row norms (the gains) at every one."""
    h, d, constant = problem.solve, problem.d, problem.constant
    size = h.shape[0]
    columns = np.zeros((size, size))                    # L's columns, in pivot order
    diag = np.diag(h).copy()
    cross = problem.exact @ problem.v                   # residual cross term at the block's start
    norms = np.einsum("ij,ij->i", cross, cross)
    pending = np.zeros((GREEDY_BLOCK, cross.shape[1]))  # the block's c rows
    start = 0                                           # first pivot of the block
    chosen = np.zeros(size, dtype=bool)
    explained = np.zeros(d + 1)
    order = np.empty(d, dtype=np.int64)
    floor = np.finfo(np.float64).eps * max(float(np.max(diag)), 1.0) * size
    done = 0.0
    k = 0
    for step in range(size):
        if constant and step == 0:
            pivot = d
        else:
            gain = np.where(chosen | (diag <= floor), -np.inf, np.maximum(norms, 0.0) / np.maximum(diag, floor))
            pivot = int(np.argmax(gain))
            if not np.isfinite(gain[pivot]):            # the rest is numerically dependent: it adds nothing
                order[k:] = np.flatnonzero(~chosen[:d])
                explained[k + 1:] = done
                break
        root = np.sqrt(diag[pivot])
        col = (h[:, pivot] - columns[:, :step] @ columns[pivot, :step]) / root
        columns[:, step] = col
        block = columns[:, start:step]
        c = (cross[pivot] - columns[pivot, start:step] @ pending[:step - start]) / root
        current_c = cross @ c - block @ (pending[:step - start] @ c)   # (C now) c
        cc = float(c @ c)
        norms += col * (col * cc - 2 * current_c)
        pending[step - start] = c
        done += cc
        diag -= col ** 2
        chosen[pivot] = True
        diag[chosen] = 0.0
        if step + 1 - start == GREEDY_BLOCK:
            cross -= columns[:, start:step + 1] @ pending
            norms = np.einsum("ij,ij->i", cross, cross)
            start = step + 1
        if pivot < d:
            order[k] = pivot
            k += 1
        explained[k] = done
    return order, _relative(problem.total - explained, problem.reference)


@dataclass(frozen=True)
class NystromFit:
    """The block at k neurons: the kept neurons (ascending), the refit second matrix [k, n] and bias
    [n], and the relative output error of the fit on the calibration activations."""

    kept: np.ndarray
    w2: np.ndarray
    bias: np.ndarray
    error: float


def refit(gram: np.ndarray, sums: np.ndarray, rows: float, w2: np.ndarray, bias: np.ndarray | None,
          kept: np.ndarray, ridge: float = RIDGE) -> NystromFit:
    """The least-squares W2', b2' on the kept neurons: V'_S = H[S, S]^-1 H[S, :] V. Without sums
    (no bias to refit) the fit has no constant column and the bias is zero."""
    problem = _problem(gram, sums, rows, w2, bias, ridge)
    kept = np.sort(np.asarray(kept, dtype=np.int64))
    constant = problem.constant
    s = np.concatenate([kept, [problem.d]]) if constant else kept
    with single_threaded_blas():
        cross = problem.exact[s] @ problem.v
        solved = np.linalg.solve(problem.solve[np.ix_(s, s)], cross)
        # ||[A 1] V - [A 1]_S V'||^2 on the measured H, whatever ridge the solve used
        residual = problem.total - 2 * float(np.sum(solved * cross)) + float(
            np.sum(solved * (problem.exact[np.ix_(s, s)] @ solved)))
    error = float(_relative(np.array([residual]), problem.reference)[0])
    bias_fit = solved[-1] if constant else np.zeros(problem.v.shape[1])
    return NystromFit(kept, solved[:len(kept)], bias_fit, error)


def neurons_for_rule(errors: np.ndarray, rule, multiple: int = 1) -> int:
    """k for a rank rule (numerics.ranks.RankRule) on the block's error curve errors[k]: the
    tolerance and energy rules the smallest k within their error, rank k itself, ratio ceil(value
    d); rounded up to `multiple` (within d)."""
    d = len(errors) - 1
    if rule.kind == "rank":
        k = min(int(rule.value), d)
    elif rule.kind == "ratio":
        k = min(d, int(np.ceil(rule.value * d)))
    else:
        budget = np.sqrt(max(1.0 - rule.value, 0.0)) + 1e-12 if rule.kind == "energy" else rule.value
        within = np.nonzero(errors <= budget)[0]
        k = int(within[0]) if len(within) else d
    k = max(1, k)
    if multiple > 1 and k % multiple:
        k = min(d, k + multiple - k % multiple)
    return k
