"""Rank decisions: the rank rules, --rank-multiple rounding that never passes break-even, and
--min-flop-reduction; on spectra alone, then end to end through optimize on a known spectrum."""

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import model_from_text
from onnx_lowrank import optimize
from onnx_lowrank.numerics import ranks as R
from onnx_lowrank.options import Options
from onnx_lowrank.rank_choice import choose_matrix_rank, choose_tucker2_ranks

# A 64 x 64 spectrum: ten unit singular values, then a tail at 1e-4. Break-even rank 32; at the
# default 10% minimum saving the largest rank allowed is floor(0.9 * 32) = 28.
SPECTRUM = np.array([1.0] * 10 + [1e-4] * 54)


def matrix_rank(**options):
    return choose_matrix_rank(SPECTRUM, 64, 64, Options(**options))


@pytest.mark.parametrize("options, rank", [
    ({}, 16),                                       # tolerance 1e-3 -> 10 (tail error 2.3e-4), rounded to 16
    ({"rank_multiple": 1}, 10),
    ({"tolerance": 0.5}, 8),                         # 8 of 10 unit values: error sqrt(2/10) = 0.45
    ({"rank": 5}, 8),
    ({"rank": 5, "rank_multiple": 1}, 5),
    ({"rank": 5, "rank_multiple": 5}, 5),
    ({"rank": 26}, 26),                              # 32 would pass the largest paying rank 28
    ({"rank": 28}, 28),
    ({"rank": 30, "min_flop_reduction": 0.0}, 32),   # rounding may reach break-even, never pass it
    ({"rank_ratio": 0.25}, 16),
    ({"rank_ratio": 0.3}, 24),                       # ceil(19.2) = 20 -> 24
    ({"energy": 0.45}, 8),                           # 5 of 10 unit values keep 50% >= 45% -> 8
    ({"energy": 0.45, "rank_multiple": 1}, 5),
])
def test_matrix_rank_rules(options, rank):
    decision = matrix_rank(**options)
    assert decision.ranks == (rank,)
    assert decision.break_even_rank == 32 and decision.reason == ""


@pytest.mark.parametrize("options, reason", [
    ({"tolerance": 1e-5}, "rank 64 for tolerance 1e-05 > 28 (break-even 32 less 10%)"),
    ({"rank": 29}, "rank 29 for rank 29 > 28 (break-even 32 less 10%)"),
    ({"rank": 17, "min_flop_reduction": 0.5}, "rank 17 for rank 17 > 16 (break-even 32 less 50%)"),
    ({"energy": 1.0}, "rank 64 for energy 1 > 28"),
])
def test_matrix_layer_that_does_not_pay_stays_dense_and_says_why(options, reason):
    decision = matrix_rank(**options)
    assert decision.ranks is None
    assert decision.reason.startswith(reason)


@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 320), st.sampled_from([1, 4, 8, 16, 64]),
       st.sampled_from([0.0, 0.1, 0.5]))
def test_matrix_rounding_never_passes_the_paying_rank(k, n, rank, multiple, reduction):
    s = np.ones(min(k, n))
    decision = choose_matrix_rank(s, k, n, Options(rank=rank, rank_multiple=multiple, min_flop_reduction=reduction))
    wanted = min(rank, k, n)
    limit = R.matrix_max_rank(k, n, reduction)
    if wanted > limit:
        assert decision.ranks is None
        return
    (chosen,) = decision.ranks
    assert wanted <= chosen <= limit
    assert R.matrix_macs(k, n, chosen) <= (1 - reduction) * R.matrix_macs(k, n) + 1e-6
    rounded = -(-wanted // multiple) * multiple
    assert chosen == (rounded if rounded <= limit else wanted)


@given(st.integers(1, 96), st.integers(1, 96), st.sampled_from([1, 3, 9]), st.sampled_from([1, 4]),
       st.integers(1, 96), st.sampled_from([1, 8, 16]), st.sampled_from([0.0, 0.1, 0.5]))
def test_tucker2_rounding_keeps_the_saving(out_ch, in_ch, kernel, stride, rank, multiple, reduction):
    options = Options(rank=rank, rank_multiple=multiple, min_flop_reduction=reduction)
    decision = choose_tucker2_ranks(np.ones(out_ch), np.ones(in_ch), out_ch, in_ch, kernel, stride, options)
    wanted = (min(rank, out_ch), min(rank, in_ch))
    pays = R.tucker2_pays(out_ch, in_ch, kernel, stride, *wanted, reduction)
    if not pays:
        assert decision.ranks is None and "of the dense MACs" in decision.reason
        return
    r_out, r_in = decision.ranks
    assert R.tucker2_pays(out_ch, in_ch, kernel, stride, r_out, r_in, reduction)
    for chosen, want, full in ((r_out, wanted[0], out_ch), (r_in, wanted[1], in_ch)):
        assert want <= chosen <= full
        assert chosen == want or chosen % multiple == 0


def test_tucker2_ranks_under_the_tolerance_rule_split_the_budget_between_modes():
    # Tail 3e-4 per mode: within 1e-3 / sqrt(2) for each, so the combined HOSVD error stays in 1e-3.
    s = np.array([1.0] * 10 + [3e-4 / np.sqrt(54 / 10)] * 54)
    assert R.rank_for_spectrum(s, R.RankRule("tolerance", 1e-3 / np.sqrt(2))) == 10
    decision = choose_tucker2_ranks(s, s, 64, 64, 9, 1, Options(rank_multiple=1))
    assert decision.ranks == (10, 10)
    # with a tail just over the per-mode budget every mode keeps more
    s_over = np.array([1.0] * 10 + [8e-4 / np.sqrt(54 / 10)] * 54)
    assert min(choose_tucker2_ranks(s_over, s_over, 64, 64, 9, 1, Options(rank_multiple=1)).ranks) > 10


def test_tucker2_rounds_each_mode_up_when_that_still_pays():
    decision = choose_tucker2_ranks(np.ones(64), np.ones(64), 64, 64, 9, 1, Options(rank=5))
    assert decision.ranks == (8, 8)
    assert decision.break_even_rank == R.tucker2_break_even_rank(64, 64, 9, 1)


# --- end to end: the same rules through optimize, read back from the report -----------------------

def known_spectrum_model(s: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    w = (u * s) @ v.T
    return model_from_text("(float[N, 64] x) => (float[N, 64] y) { [fc] y = MatMul(x, W) }", W=w.astype(np.float32))


@pytest.mark.parametrize("options, rank", [
    ({}, 16), ({"tolerance": 0.5}, 8), ({"rank": 5, "rank_multiple": 1}, 5),
    ({"rank_ratio": 0.25}, 16), ({"energy": 0.45}, 8), ({"rank": 30, "min_flop_reduction": 0.0}, 32),
])
def test_optimize_applies_the_rank_rule(options, rank):
    _, report = optimize(known_spectrum_model(SPECTRUM), validate=False, **options)
    (layer,) = report.layers
    assert layer.rank == [rank]
    assert layer.weight_error == pytest.approx(np.sqrt(np.sum(SPECTRUM[rank:] ** 2) / np.sum(SPECTRUM**2)), rel=1e-3)


@pytest.mark.parametrize("options, reason", [
    ({"tolerance": 1e-5}, "rank 64 for tolerance 1e-05 > 28"),
    ({"rank": 20, "min_flop_reduction": 0.5}, "rank 20 for rank 20 > 16 (break-even 32 less 50%)"),
])
def test_optimize_leaves_a_layer_that_does_not_pay_and_reports_why(options, reason):
    model = known_spectrum_model(SPECTRUM)
    optimized, report = optimize(model, validate=False, **options)
    assert optimized.SerializeToString() == model.SerializeToString()
    (layer,) = report.layers
    assert layer.status == "skipped" and layer.reason.startswith(reason)
    assert layer.break_even_rank == 32.0
    assert any(reason in note and "unchanged" in note for note in report.notes)


# --- deciding a refusal without the SVD (rank_choice.screen_matrix_rank) ---------------------

def _screen_cases():
    from models import synthetic
    rng = np.random.default_rng(0)
    full = rng.standard_normal((96, 160)).astype(np.float32)
    cases = {
        "full-rank": full,
        "full-rank tall": full.T.copy(),
        "low-rank": synthetic.low_rank_matrix(rng, 128, 96, 12, 0.0),
        "low-rank + noise 1e-4": synthetic.low_rank_matrix(rng, 128, 96, 12, 1e-4),
        "low-rank + noise 1e-3": synthetic.low_rank_matrix(rng, 96, 128, 12, 1e-3),
        "low-rank + noise 0.3": synthetic.low_rank_matrix(rng, 96, 128, 24, 0.3),
        "fp16 low-rank": synthetic.low_rank_matrix(rng, 64, 96, 8, 1e-3).astype(np.float16),
        "fp16 full-rank": full.astype(np.float16),
        "zeros": np.zeros((32, 48), np.float32),
    }
    # a spectrum whose tail error at one rank is the tolerance itself (to float64 rounding):
    # the cheap spectrum cannot tell which side it lies on, so the SVD must decide
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    s = np.ones(64)
    s[40:] = np.sqrt(1e-6 * 40 / 24 / (1 - 1e-6))
    cases["tail at the tolerance"] = (u * s) @ v.T
    return cases


SCREEN_RULES = [{}, {"tolerance": 1e-2, "rank_multiple": 16}, {"tolerance": 0.35}, {"energy": 0.9},
                {"rank": 40}, {"rank": 4}, {"rank_ratio": 0.5}, {"rank_ratio": 0.1}, {"min_flop_reduction": 0.5}]


@pytest.mark.parametrize("rule", SCREEN_RULES, ids=str)
@pytest.mark.parametrize("case", list(_screen_cases()))
def test_screen_refuses_exactly_what_the_svd_refuses(case, rule):
    """Old (full SVD, then choose_matrix_rank) vs new (screen, then the SVD only when it does not
    refuse): the same decision, the same reason (with the rank it names), for every case."""
    from onnx_lowrank.numerics.svd import svd
    from onnx_lowrank.rank_choice import screen_matrix_rank

    w = _screen_cases()[case]
    options = Options(**rule)
    old = choose_matrix_rank(svd(w)[1], *w.shape, options)
    screened = screen_matrix_rank(w, options)
    new = old if screened is None else screened
    assert new == old
    if screened is not None:
        assert old.ranks is None


def test_screen_leaves_the_boundary_and_paying_layers_to_the_svd():
    from onnx_lowrank.rank_choice import screen_matrix_rank

    cases = _screen_cases()
    assert screen_matrix_rank(cases["full-rank"], Options()) is not None          # refused without an SVD
    assert screen_matrix_rank(cases["low-rank + noise 1e-4"], Options()) is None  # pays: the SVD factorizes
    boundary = cases["tail at the tolerance"]
    assert screen_matrix_rank(boundary, Options(min_flop_reduction=0.9)) is None  # in doubt: the SVD decides
