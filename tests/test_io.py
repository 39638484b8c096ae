"""Loading and saving (issue 4): external data is read lazily and streamed file to file, outputs
are atomic, and the caller's model is never changed by a save."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import model_from_text, relative_error, run_ort

from models.synthetic import low_rank_matrix
from onnx_lowrank import load_model, optimize, save_model
from onnx_lowrank.graph import external_base, model_size

RNG = np.random.default_rng(3)
LOW = low_rank_matrix(RNG, 64, 96, 8, noise=0)
FULL = RNG.standard_normal((96, 96)).astype(np.float32)


def _two_layer(tmp_path):
    """y = (x LOW) FULL: the first layer decomposes, the second is full rank and is carried along."""
    model = model_from_text("""(float[N, 64] x) => (float[N, 96] y) {
        [low] h = MatMul(x, LOW)
        [full] y = MatMul(h, FULL)
    }""", LOW=LOW, FULL=FULL)
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)   # onnx.save moves the bytes of what it saves out of the model
    onnx.save(on_disk, src, save_as_external_data=True, location="weights.bin", size_threshold=0)
    return model, src


def test_external_weights_are_read_lazily_and_copied_file_to_file(tmp_path):
    model, src = _two_layer(tmp_path)
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    loaded = load_model(src)
    assert all(external_base(t) == str(src.parent.resolve()) for t in loaded.graph.initializer)
    assert model_size(loaded) >= LOW.nbytes + FULL.nbytes        # counted, though not in memory

    optimized, report = optimize(src, measure=False, skip=("merge_linear", "merge_factors"))
    assert [r.status for r in report.candidates] == ["decomposed", "skipped"]
    assert report.parity.passed
    full = next(t for t in optimized.graph.initializer if t.name == "FULL")
    assert external_base(full) is not None and not full.raw_data   # still only on disk

    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    assert save_model(optimized, out) == [out.parent / "model.onnx.data", out]
    saved = onnx.load(out)   # relative locations: loads from its own folder
    assert next(t for t in saved.graph.initializer if t.name == "FULL").raw_data == FULL.tobytes()
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    assert relative_error(run_ort(saved, {"x": x})[0], run_ort(model, {"x": x})[0]) < 1e-5
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before   # input untouched


def test_lazy_model_can_be_saved_inline(tmp_path):
    _, src = _two_layer(tmp_path)
    optimized, _ = optimize(src, measure=False, validate=False)
    out = tmp_path / "inline.onnx"
    assert save_model(optimized, out, external_data=False) == [out]
    onnx.checker.check_model(str(out), full_check=True)


def test_save_does_not_change_the_callers_model(tmp_path):
    model = model_from_text("(float[N, 64] x) => (float[N, 96] y) { [fc] y = MatMul(x, W) }", W=LOW)
    snapshot = model.SerializeToString()
    save_model(model, tmp_path / "ext.onnx", external_data=True)
    assert model.SerializeToString() == snapshot
    assert (tmp_path / "ext.onnx.data").stat().st_size == LOW.nbytes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left


def test_an_inline_save_is_byte_for_byte_what_protobuf_writes(tmp_path):
    """save_model streams the weights one at a time (no second copy of the model in memory), and the
    file is still protobuf's own serialization: fields in order, subgraphs, metadata and small
    typed-data constants included."""
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "FULL"], ["y"])], "then", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "else", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(FULL[:3], "unused_in_branch")])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)], "g",
        [onnx.helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, []),
         onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 96])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 96])],
        [onnx.numpy_helper.from_array(FULL, "FULL"),
         onnx.helper.make_tensor("typed", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
         onnx.helper.make_tensor("packed", onnx.TensorProto.INT4, [3], np.array([1, 2, 3], np.int8).tobytes()[:2],
                                 raw=True)],
        doc_string="graph doc")
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8,
                                   doc_string="model doc", producer_name="test")
    onnx.helper.set_model_props(model, {"author": "us"})
    save_model(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()


def test_a_lazily_exported_model_writes_the_same_file(tmp_path):
    """export_graph_lazily leaves the unchanged weights as stubs and names the tensors holding
    their bytes; written with those sources (inline and with external data) the files are the
    ones export_graph's full model gives, and the stubs hold no bytes."""
    from onnx_lowrank.graph import export_graph, export_graph_lazily, import_graph
    from onnx_lowrank.io import write_model
    w1 = np.arange(96 * 64, dtype=np.float32).reshape(96, 64) / 1000
    w2 = np.ones((64, 8), np.float32)
    model = model_from_text("(float[N, 96] x) => (float[N, 8] y) { h = MatMul(x, W1) y = MatMul(h, W2) }",
                            W1=w1, W2=w2)
    full = export_graph(import_graph(model), model)
    lazy, sources = export_graph_lazily(import_graph(model), model)
    assert set(sources) == {"W1", "W2"}
    assert all(not t.HasField("raw_data") for t in lazy.graph.initializer if t.name in sources)
    for external in (False, True):
        for name, written in (("full", full), ("lazy", lazy)):
            (tmp_path / f"{name}{external}").mkdir()
            write_model(written, tmp_path / f"{name}{external}" / "m.onnx", external,
                        sources=sources if written is lazy else None)
        for suffix in ("", ".data") if external else ("",):
            assert ((tmp_path / f"lazy{external}" / f"m.onnx{suffix}").read_bytes()
                    == (tmp_path / f"full{external}" / f"m.onnx{suffix}").read_bytes())
    x = np.ones((2, 96), np.float32)
    np.testing.assert_array_equal(run_ort(onnx.load(str(tmp_path / "lazyTrue" / "m.onnx")), {"x": x})[0],
                                  run_ort(model, {"x": x})[0])
