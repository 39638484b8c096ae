"""Global rank allocation: meets the target, spends error where it is cheap, skips what never pays."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnx_lowrank.numerics.ranks import matrix_max_rank, tucker2_macs, tucker2_pays
from onnx_lowrank.numerics.svd import relative_error_by_rank
from onnx_lowrank.rank_allocation import (ConvSpectrum, LayerSpectrum, allocate_ranks, flop_ratio_for_speedup, predicted_error,
                                          rank_grid)


def layer(name, k, n, decay, positions=1.0, max_rank=None):
    s = np.exp(-decay * np.arange(min(k, n)))
    return LayerSpectrum(name, k, n, relative_error_by_rank(s), matrix_max_rank(k, n, 0.1) if max_rank is None
                         else max_rank, positions)


@given(st.lists(st.tuples(st.integers(16, 96), st.integers(16, 96), st.floats(0.001, 0.5)), min_size=1, max_size=6),
       st.floats(0.3, 0.95), st.sampled_from(["flops", "params"]))
def test_meets_the_target_whenever_the_lowest_ranks_can(shapes, ratio, kind):
    layers = [layer(f"l{i}", k, n, d, positions=i + 1) for i, (k, n, d) in enumerate(shapes)]
    allocation = allocate_ranks(layers, ratio, kind, multiple=8)
    lowest = {l.name: (rank_grid(l, 8) or [None])[-1] for l in layers}
    floor = sum(l.cost(lowest[l.name], kind) for l in layers) / allocation.cost_before
    assert allocation.cost_after == pytest.approx(sum(l.cost(allocation.ranks[l.name], kind) for l in layers))
    if ratio >= floor + 1e-9:
        assert allocation.met and allocation.cost_after <= ratio * allocation.cost_before * (1 + 1e-12)
    for l in layers:
        rank = allocation.ranks[l.name]
        assert rank is None or rank in rank_grid(l, 8)


def test_prefers_the_layer_whose_error_is_cheap():
    cheap = layer("cheap", 64, 64, decay=0.5)     # spectrum falls fast: truncating costs little error
    costly = layer("costly", 64, 64, decay=0.001)  # flat spectrum: every rank dropped costs as much
    allocation = allocate_ranks([cheap, costly], ratio=0.7, kind="flops")
    assert allocation.met
    assert allocation.ranks["costly"] is None
    assert allocation.ranks["cheap"] is not None
    # and the same split is better than compressing both layers alike
    even = {"cheap": 16, "costly": 16}
    assert predicted_error([cheap, costly], allocation.ranks) < predicted_error([cheap, costly], even)


def test_flops_weigh_positions_params_do_not():
    """Same weights, one layer runs on 16x more rows: a FLOP target is met most cheaply there."""
    busy, idle = layer("busy", 64, 64, 0.05, positions=16), layer("idle", 64, 64, 0.05, positions=1)
    assert allocate_ranks([busy, idle], 0.8, "flops").ranks["idle"] is None
    params = allocate_ranks([busy, idle], 0.8, "params")
    assert params.met and params.cost_before == 2 * 64 * 64


def test_a_layer_that_never_pays_is_never_chosen_and_the_target_can_be_missed():
    never = layer("never", 8, 8, 0.5, max_rank=0)
    allocation = allocate_ranks([never], 0.5)
    assert allocation.ranks == {"never": None} and not allocation.met and allocation.steps == []


def test_the_steps_replay_to_the_final_ranks_and_undo_in_order():
    layers = [layer(f"l{i}", 64, 48, d) for i, d in enumerate((0.02, 0.1, 0.3))]
    allocation = allocate_ranks(layers, 0.4)
    assert allocation.after(len(allocation.steps)) == allocation.ranks
    assert all(rank is None for rank in allocation.after(0).values())
    errors = [predicted_error(layers, allocation.after(i)) for i in range(len(allocation.steps) + 1)]
    assert errors == sorted(errors)    # each step adds error: backing off removes it


def test_flop_ratio_for_speedup_is_amdahl():
    assert flop_ratio_for_speedup(1.25, 1.0) == pytest.approx(0.8)
    assert flop_ratio_for_speedup(1.25, 0.5) == pytest.approx(0.6)
    assert flop_ratio_for_speedup(3.0, 0.5) < 0     # out of reach: the rest takes half the time


def conv(name, out_ch, in_ch, decay, positions=64.0, stride=1):
    errors = [relative_error_by_rank(np.exp(-decay * np.arange(c))) for c in (out_ch, in_ch)]
    return ConvSpectrum(name, out_ch, in_ch, 9, stride, *errors, 0.1, positions)


def test_conv_grid_shrinks_both_modes_together_and_every_step_pays():
    spectrum = conv("c", 64, 32, 0.1)
    # (64, 32) costs 23552 MACs a pixel against 18432 dense; (48, 24) 14208, within 90% of dense
    assert spectrum.grid(8) == [(48, 24), (32, 16), (16, 8)]
    assert not tucker2_pays(64, 32, 9, 1, 64, 32, 0.1)
    assert spectrum.cost((16, 8), "flops") == 64 * tucker2_macs(64, 32, 9, 1, 16, 8)
    assert spectrum.cost(None, "params") == 64 * 32 * 9
    assert spectrum.squared_error((16, 8)) == pytest.approx(spectrum.out_errors[16] ** 2 + spectrum.in_errors[8] ** 2)


def test_convs_and_matrices_share_one_budget():
    """A conv whose spectrum falls fast gives up its MACs before a flat matrix layer does."""
    layers = [conv("conv", 64, 64, 0.3), layer("fc", 64, 64, 0.001, positions=64)]
    allocation = allocate_ranks(layers, 0.6, "flops")
    assert allocation.met and isinstance(allocation.ranks["conv"], tuple) and allocation.ranks["fc"] is None
    assert allocation.after(len(allocation.steps)) == allocation.ranks
