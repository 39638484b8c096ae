"""The affine algebra of the normalize passes (numerics/affine.py) on arrays alone: composing and
adding maps equals applying them one after the other, and every refusal says why. Conv maps are
applied through their unfolded patches (numerics/patches.py), so no runtime is involved.

Tolerance 1e-10: everything is float64, and the products here sum at most a few hundred terms."""

import numpy as np
import pytest

from onnx_lowrank.numerics.affine import CONV, MATRIX, Affine, add, compose, composed_macs, representable
from onnx_lowrank.numerics.patches import ConvWindow, conv_patches

RNG = np.random.default_rng(0)
TOL = 1e-10


def apply(affine: Affine, x: np.ndarray) -> np.ndarray:
    if affine.kind == MATRIX:
        y = x @ affine.weight
        return y if affine.bias is None else y + affine.bias
    o, _, kh, kw = affine.weight.shape
    window = ConvWindow.from_attrs((kh, kw), affine.geometry)
    rows = conv_patches(x, window) @ affine.weight.reshape(o, -1).T
    if affine.bias is not None:
        rows = rows + affine.bias
    n = x.shape[0]
    h = (x.shape[2] + window.pads[0] + window.pads[2] - kh) // window.strides[0] + 1
    w = (x.shape[3] + window.pads[1] + window.pads[3] - kw) // window.strides[1] + 1
    return rows.reshape(n, h, w, o).transpose(0, 3, 1, 2)


def conv(o, i, k, bias=True, **geometry) -> Affine:
    return Affine(CONV, RNG.standard_normal((o, i, k, k)), RNG.standard_normal(o) if bias else None, geometry)


def test_composed_matrices_are_the_chain():
    first = Affine(MATRIX, RNG.standard_normal((6, 5)), RNG.standard_normal(5))
    second = Affine(MATRIX, RNG.standard_normal((5, 4)), RNG.standard_normal(4))
    x = RNG.standard_normal((3, 6))
    np.testing.assert_allclose(apply(compose(first, second), x), apply(second, apply(first, x)), atol=TOL)


@pytest.mark.parametrize("order", ["kxk then 1x1", "1x1 then kxk"])
def test_composed_convs_are_the_chain(order):
    kxk, pointwise = conv(4, 4, 3, strides=[2, 2], pads=[1, 0, 1, 2]), conv(4, 4, 1)
    first, second = (kxk, pointwise) if order == "kxk then 1x1" else (pointwise, conv(4, 4, 3, strides=[2, 2]))
    x = RNG.standard_normal((2, 4, 7, 7))
    np.testing.assert_allclose(apply(compose(first, second), x), apply(second, apply(first, x)), atol=TOL)


def test_a_bias_in_front_of_a_padded_conv_is_refused():
    assert "zero padding" in compose(conv(4, 4, 1), conv(4, 4, 3, pads=[1, 1, 1, 1]))
    assert "neither conv" in compose(conv(4, 4, 3), conv(4, 4, 3))
    assert compose(Affine(MATRIX, np.ones((3, 2)), None), conv(4, 2, 1)) == "a matrix and a conv do not chain"


def test_a_1x1_branch_is_embedded_in_the_3x3_it_is_added_to():
    """RepVGG: a 1x1 conv without pads reads the centre of a 3x3 padded by one."""
    big, small = conv(4, 3, 3, pads=[1, 1, 1, 1]), conv(4, 3, 1)
    x = RNG.standard_normal((2, 3, 6, 6))
    np.testing.assert_allclose(apply(add(small, big), x), apply(small, x) + apply(big, x), atol=TOL)
    assert add(conv(4, 3, 1, pads=[1, 1, 1, 1]), big) == "the convs' kernels do not cover the same windows"
    assert add(conv(4, 3, 3, strides=[2, 2]), conv(4, 3, 3)) == "the convs differ in strides, pads or dilations"


def test_zero_pads_are_no_pads():
    a, b = conv(4, 3, 3, pads=[0, 0, 0, 0], strides=[1, 1]), conv(4, 3, 3)
    assert isinstance(add(a, b), Affine) and a.pointwise is False and conv(4, 3, 1, pads=[0, 0, 0, 0]).pointwise


def test_channelwise_before_and_after():
    scale, shift = RNG.standard_normal(3), RNG.standard_normal(3)
    m = Affine(MATRIX, RNG.standard_normal((3, 3)), RNG.standard_normal(3))
    x = RNG.standard_normal((5, 3))
    np.testing.assert_allclose(apply(m.then_channelwise(scale, shift), x), apply(m, x) * scale + shift, atol=TOL)
    np.testing.assert_allclose(apply(m.after_channelwise(scale, shift), x), apply(m, x * scale + shift), atol=TOL)
    c = conv(3, 3, 3)
    xc = RNG.standard_normal((2, 3, 5, 5))
    np.testing.assert_allclose(apply(c.after_channelwise(scale, shift), xc),
                               apply(c, xc * scale[:, None, None] + shift[:, None, None]), atol=TOL)
    assert "padded" in conv(3, 3, 3, pads=[1, 1, 1, 1]).after_channelwise(scale, shift)
    assert "grouped" in conv(3, 3, 3, group=3).after_channelwise(scale, shift)


def test_composed_macs_and_representable():
    class Layer:
        def __init__(self, i, o, k):
            self.in_channels, self.out_channels, self.kernel = i, o, k

    assert composed_macs(Layer(64, 16, 9), Layer(16, 128, 1)) == 64 * 128 * 9
    assert representable(Affine(MATRIX, np.full((2, 2), 6e4), None), np.float16)
    assert not representable(Affine(MATRIX, np.full((2, 2), 7e4), None), np.float16)
