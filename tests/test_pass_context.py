"""The passes' context is read-only: a stage that decides again makes a new LayerPlan, and each run
of the passes gets a fresh RewriteState that keeps only the folds of the normalize run."""

from __future__ import annotations

import dataclasses

import pytest

from onnx_lowrank.options import Options
from onnx_lowrank.passes.base import LayerPlan, PassContext, RewriteState


def test_the_context_and_its_layer_plan_cannot_be_reassigned():
    context = PassContext(Options())
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.layers = LayerPlan(ranks={"fc": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.layers.ranks = {"fc": 8}


def test_another_run_of_the_passes_gets_a_fresh_state_and_the_same_folds():
    folds = {"w": object()}
    state = RewriteState(names={"a", "b"}, factors={("w",): ()}, choices={"w": None}, folds=folds)
    context = PassContext(Options(), layers=LayerPlan(grams={"fc": 1}), state=state)
    again = context.rewriting(context.layers.with_(ranks={"fc": 4}), names={"a"})
    assert again.state is not state and again.state.folds is folds
    assert again.state.names == {"a"} and not again.state.factors and not again.state.choices
    assert again.layers.ranks == {"fc": 4} and again.layers.grams == {"fc": 1}
    assert context.layers.ranks == {} and state.names == {"a", "b"}   # the first run's are untouched
