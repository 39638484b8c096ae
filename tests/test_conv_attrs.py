"""numerics/conv_attrs.py on attribute dicts: every auto_pad mode, bytes as str, the defaults."""

import pytest

from onnx_lowrank.numerics.conv_attrs import ConvAttrs, conv_attrs


def test_defaults_follow_the_kernel_rank():
    assert conv_attrs({}, (3, 3)) == ConvAttrs((3, 3), (1, 1), (0, 0, 0, 0), (1, 1), "NOTSET", 1)
    assert conv_attrs({}, (5,)) == ConvAttrs((5,), (1,), (0, 0), (1,), "NOTSET", 1)
    one = conv_attrs({}, (1, 1))
    assert one.pointwise and not one.padded and not one.dilated and one.stride == 1


def test_given_attributes_are_read_as_ints():
    attrs = {"strides": [2, 3], "pads": [1, 0, 1, 2], "dilations": [2, 1], "group": 4}
    conv = conv_attrs(attrs, (3, 3))
    assert conv == ConvAttrs((3, 3), (2, 3), (1, 0, 1, 2), (2, 1), "NOTSET", 4)
    assert conv.stride == 6 and conv.padded and conv.dilated and not conv.pointwise


@pytest.mark.parametrize("auto_pad", ["NOTSET", b"NOTSET"])
def test_notset_keeps_the_explicit_pads(auto_pad):
    conv = conv_attrs({"auto_pad": auto_pad, "pads": [1, 1, 1, 1]}, (3, 3))
    assert conv.auto_pad == "NOTSET" and conv.pads == (1, 1, 1, 1) and conv.padded and not conv.same_padded


@pytest.mark.parametrize("auto_pad", ["VALID", b"VALID"])
def test_valid_is_notset_without_pads(auto_pad):
    conv = conv_attrs({"auto_pad": auto_pad}, (1, 1))
    assert conv == conv_attrs({}, (1, 1)) == conv_attrs({"pads": [0, 0, 0, 0]}, (1, 1))
    assert conv.pointwise


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", b"SAME_UPPER", b"SAME_LOWER"])
def test_same_padding_has_no_known_pads(auto_pad):
    conv = conv_attrs({"auto_pad": auto_pad}, (1, 1))
    mode = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    assert conv.auto_pad == mode and conv.pads == () and conv.same_padded and conv.padded
    assert not conv.pointwise   # the pads follow the input size: not known to be none


def test_without_a_kernel_the_attributes_say_the_rank():
    assert conv_attrs({"kernel_shape": [3, 3]}).kernel == (3, 3)
    assert conv_attrs({"kernel_shape": [3, 3]}, (5, 5)).kernel == (5, 5)   # the weight's own dims win
    assert conv_attrs({"strides": [2, 2]}).pads == (0, 0, 0, 0)
    assert conv_attrs({"pads": [0, 1, 0, 1]}).strides == (1, 1)
    nothing = conv_attrs({})
    assert nothing.stride == 1 and not nothing.padded and nothing.group == 1
