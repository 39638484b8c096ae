"""Spatial SVD (kh x 1 then 1 x kw): exact on a weight of that separable rank, errors known from
the spectrum, and the two-conv chain in ONNX Runtime with strides, pads and auto_pad."""

import numpy as np
import pytest

from helpers import EXACT, assert_rewrite, model_from_text
from onnx_lowrank.numerics.spatial_svd import (spatial_spectrum, spatial_svd, spatial_svd_break_even_rank,
                                               spatial_svd_macs, spatial_svd_reconstruct)
from onnx_lowrank.numerics.svd import relative_error_by_rank
from onnx_lowrank.numerics.tucker import relative_error


def separable_weight(rng, out_ch, in_ch, kh, kw, rank) -> np.ndarray:
    """W[o, i, h, w] = sum_r U[o, r, w] V[r, i, h]: spatial rank `rank` exactly."""
    return np.einsum("orw,rih->oihw", rng.standard_normal((out_ch, rank, kw)), rng.standard_normal((rank, in_ch, kh)))


def test_exact_at_the_separable_rank_and_errors_from_the_spectrum():
    w = separable_weight(np.random.default_rng(0), 12, 8, 3, 5, 4)
    s = spatial_spectrum(w)
    assert np.sum(s > 1e-10 * s[0]) == 4
    vertical, horizontal = spatial_svd(w, 4)
    assert vertical.shape == (4, 8, 3, 1) and horizontal.shape == (12, 4, 1, 5)
    assert relative_error(w, spatial_svd_reconstruct(vertical, horizontal)) < 1e-12
    # below that rank the error is the discarded tail of the spectrum (Eckart-Young), exactly
    for rank in (1, 2, 3):
        assert relative_error(w, spatial_svd_reconstruct(*spatial_svd(w, rank))) == pytest.approx(
            relative_error_by_rank(s)[rank], rel=1e-9)


def test_macs_count_the_vertical_conv_at_input_width():
    assert spatial_svd_macs(64, 32, 3, 3) == 64 * 32 * 9
    assert spatial_svd_macs(64, 32, 3, 3, stride_w=2, rank=16) == 16 * (2 * 32 * 3 + 64 * 3)
    r = spatial_svd_break_even_rank(64, 32, 3, 3)
    assert spatial_svd_macs(64, 32, 3, 3, rank=r) <= 64 * 32 * 9 < spatial_svd_macs(64, 32, 3, 3, rank=r + 1)


@pytest.mark.parametrize("attrs", [
    "pads = [1, 2, 1, 2]",
    "strides = [2, 3], pads = [0, 1, 2, 1]",
    "dilations = [2, 1], pads = [2, 2, 2, 2]",
    'auto_pad = "SAME_UPPER", strides = [2, 2]',
])
def test_spatial_svd_rewrite_has_parity_in_ort(attrs):
    rng = np.random.default_rng(1)
    w = separable_weight(rng, 24, 16, 3, 5, 4).astype(np.float32)
    model = model_from_text(
        f"(float[N, 16, 13, 14] x) => (float[N, 24, ?, ?] y) {{ [conv] y = Conv <{attrs}> (x, W, B) }}",
        W=w, B=rng.standard_normal(24).astype(np.float32))
    optimized, report = assert_rewrite(model, ops={"Conv": 2}, max_error=EXACT, conv_method="spatial-svd",
                                       rank_multiple=1, dims={"N": 2})
    (record,) = report.layers
    assert record.method == "spatial-svd" and record.rank == [4]
    kernels = [next(list(a.ints) for a in n.attribute if a.name == "kernel_shape") for n in optimized.graph.node]
    assert kernels == [[3, 1], [1, 5]]
    assert record.params_after == 4 * 16 * 3 + 24 * 4 * 5


def test_a_spatial_rank_that_does_not_pay_is_refused_with_its_reason():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)      # full spatial rank 24 > break-even 12
    model = model_from_text("(float[N, 8, 6, 6] x) => (float[N, 8, 4, 4] y) { [conv] y = Conv(x, W) }", W=w)
    from onnx_lowrank import optimize
    optimized, report = optimize(model, conv_method="spatial-svd", validate=False)
    assert optimized is model
    assert report.layers[0].reason.startswith("rank 24 for tolerance 0.001 > ")
