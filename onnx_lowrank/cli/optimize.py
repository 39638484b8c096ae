"""`onnx-lowrank optimize [IN [OUT]]`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ..errors import OptionError
from ..options import CONV_METHODS, DEFAULT_CACHE_DIR, MLP_FORMS, MLP_SELECTIONS, measure_default
from ..runtime import PROVIDERS
from .common import add_layer_selection, check_side_outputs, float_arg, int_arg, peak_memory, skip_list, write_text

#: The model `onnx-lowrank optimize` works on when given none: a low-rank MLP from models/.
SAMPLE_MODEL = Path(__file__).resolve().parents[2] / "models" / "lowrank_mlp_small.onnx"


def add_parser(sub) -> None:
    p = sub.add_parser("optimize", help="decompose a model's MatMul / Gemm / Conv weights",
                       description="Replace weight-carrying MatMul, Gemm and Conv nodes by low-rank factors, "
                                   "check the result in ONNX Runtime, and report per layer what was done.")
    p.add_argument("input", nargs="?", help=f"input .onnx (default: the bundled sample {SAMPLE_MODEL.name})")
    p.add_argument("output", nargs="?", help="output .onnx (default: INPUT's name with .lowrank.onnx, in the current directory)")
    rule = p.add_argument_group("rank rule (one of; default --tolerance 1e-3)")
    rule.add_argument("--tolerance", type=float_arg, default=1e-3, metavar="T",
                      help="smallest rank whose relative weight error is <= T (default 1e-3: near-lossless)")
    rule.add_argument("--rank", type=int_arg, metavar="N", help="this rank for every layer (then rounded up to --rank-multiple, as every rule is)")
    rule.add_argument("--rank-ratio", type=float_arg, metavar="F", help="rank = F x min(K, N)")
    rule.add_argument("--energy", type=float_arg, metavar="F", help="keep fraction F of the squared singular values")
    rule.add_argument("--rank-multiple", default=8, metavar="M|auto",
                      help="round ranks up to a multiple of M, never past break-even, and step the measured rank "
                           "search by M; auto: find the step by measuring (default 8)")
    rule.add_argument("--min-flop-reduction", type=float_arg, default=0.1, metavar="F",
                      help="decompose a layer only if it saves at least this fraction of its MACs (default 0.1)")
    data = p.add_argument_group("data-aware compression")
    data.add_argument("--calibration", metavar="FILE.npz|DIR",
                      help="samples (keys = input names, leading axis = samples; or a directory of .npz): ranks and "
                           "truncations minimise the error on these inputs (whitened SVD); --max-error is then checked "
                           "on held-back samples and ranks are backed off until it holds")
    data.add_argument("--synthetic-tokens", type=int_arg, default=1, metavar="N",
                      help="with --calibration, for a model whose integer inputs index an embedding table (token "
                           "ids): N synthetic sequences per calibration sample, ids drawn uniformly from the table "
                           "(length, mask, first and last token copied), join the Gram matrices, so that the "
                           "truncation keeps what texts of other domains than the calibration's use (default 1; 0: "
                           "the calibration samples only)")
    data.add_argument("--error-correction", action="store_true",
                      help="with --calibration, refit the factorized layers (k x k convs included) to the original "
                           "outputs, depth by depth, on the inputs they see in the compressed model (one more pass "
                           "over the samples per depth)")
    data.add_argument("--refine", action="store_true",
                      help="with --calibration, train the factors by gradient descent (Adam, block by block, early "
                           "stopping on held-out samples) to the original's tensors at the block outputs; needs "
                           "torch: pip install 'onnx-lowrank[refine]'")
    data.add_argument("--refine-steps", type=int_arg, default=200, metavar="N",
                      help="Adam steps per block at most (default 200)")
    target = data.add_mutually_exclusive_group()
    target.add_argument("--target-flops", type=float_arg, metavar="F",
                        help="choose all ranks together so the candidate layers keep F of their MACs")
    target.add_argument("--target-params", type=float_arg, metavar="F",
                        help="likewise for their parameters")
    target.add_argument("--target-speedup", type=float_arg, metavar="S",
                        help="likewise for a whole-model speedup S (Amdahl over the layers' profiled share of time); "
                             "with --measure the result is timed against the original and re-allocated while short")
    hw = p.add_argument_group("hardware-aware ranks (each candidate layer timed alone in ONNX Runtime)")
    measure = hw.add_mutually_exclusive_group()
    measure.add_argument("--measure", dest="measure", action="store_true", default=measure_default(),
                         help="search ranks on measured latency and keep a layer dense unless measurably faster "
                              "(default, unless ONNX_LOWRANK_MEASURE=0)")
    measure.add_argument("--no-measure", dest="measure", action="store_false",
                         help="decide by the FLOP model only: no timing, output independent of the machine")
    hw.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, metavar="DIR",
                    help="measured latencies are kept here, so a second run costs no timing (default %(default)s)")
    hw.add_argument("--rank-search-floor", type=float_arg, default=0.75, metavar="F",
                    help="search ranks from the rule's rank down to F x it (default 0.75)")
    hw.add_argument("--min-layer-speedup", type=float_arg, default=1.05, metavar="S",
                    help="keep a layer factorized only if it runs S x faster than the dense op (default 1.05)")
    conv = p.add_argument_group("convolutions")
    conv.add_argument("--conv-method", default="tucker2", choices=CONV_METHODS,
                      help="k x k convs: Tucker-2, branched Tucker (grouped core), spatial SVD (kh x 1 then 1 x kw), "
                           "or auto: the fastest of them per layer at the same error budget (default tucker2)")
    conv.add_argument("--branches", type=int_arg, default=4, metavar="G",
                      help="branches (core groups) of branched-tucker; ranks become multiples of G (default 4)")
    mlp = p.add_argument_group("MLP blocks (MatMul -> activation -> MatMul)")
    mlp.add_argument("--mlp-form", default="svd", choices=MLP_FORMS,
                     help="svd: each MatMul by its own SVD; nystrom: keep k of the block's neurons and refit the "
                          "second matrix on the calibration activations (two smaller dense MatMuls or a Conv -> 1x1 "
                          "Conv pair on k channels, no extra "
                          "node); auto: each block is one more choice of the global allocation (--target-*), its k "
                          "neurons or its layers' SVD ranks, whichever adds least predicted error per MAC saved "
                          "(nystrom and auto need --calibration; default svd)")
    mlp.add_argument("--mlp-selection", default="greedy", choices=MLP_SELECTIONS,
                     help="which neurons nystrom keeps: greedy least-squares forward selection, energy "
                          "(activation energy x output-weight norm), leverage (ridge leverage) (default greedy)")
    sel = p.add_argument_group("which layers")
    add_layer_selection(sel, "passes not to run (names as in the report)")
    sel.add_argument("--fuse-horizontal", action="store_true",
                     help="fuse MatMuls that read one input (e.g. Q/K/V first factors) into one MatMul + Split")
    sel.add_argument("--merge-across-activations", action="store_true",
                     help="merge a decomposed layer's outer factors into the dense neighbours across one "
                          "activation (the paper's bottleneck merge): NOT exact, needs fine-tuning; the parity "
                          "check measures the output error (accept it with --max-error)")
    p.add_argument_group("int8").add_argument(
        "--quantize", choices=["int8"],
        help="run ONNX Runtime's int8 quantization on the result as the last stage (static QDQ for convolutional "
             "models with --calibration, dynamic int8 MatMul/Gemm weights otherwise); the gate and the timing "
             "judge the quantized model")
    chk = p.add_argument_group("proof")
    chk.add_argument("--no-validate", dest="validate", action="store_false",
                     help="skip the parity check in ONNX Runtime")
    chk.add_argument("--provider", choices=list(PROVIDERS), default="cpu",
                     help="ONNX Runtime execution provider of the parity check and --bench (default cpu)")
    chk.add_argument("--bench", action="store_true",
                     help="time the original against the result in ONNX Runtime (interleaved) and report the speedup")
    chk.add_argument("--max-error", type=_max_error, metavar="E|none",
                     help="the quality gate: every output's ||y - y0|| / ||y0|| <= E on held-out samples (held-back "
                          "calibration samples, else generated inputs); default 0.25 (about cosine 0.97), tighter "
                          "where the rank rule implies less; none: measure only (UNGATED)")
    chk.add_argument("--min-top1", type=float_arg, metavar="A",
                     help="outputs that look like class scores must also agree with the original's top-1 on a "
                          "share >= A of their rows (default 0.95; not checked with --max-error none)")
    chk.add_argument("--allow-slower", action="store_true",
                     help="keep a result that measures slower than the original as a whole model (by default "
                          "such a result is dropped and the input written unchanged; needs --measure)")
    chk.add_argument("--shape", action="append", metavar="NAME:D1,D2,...",
                     help="input shape for the check (repeatable); dynamic dims default to --batch, others 16")
    chk.add_argument("--batch", type=int_arg, default=4, help="value for dynamic batch dims (default 4)")
    chk.add_argument("--seed", type=int_arg, default=0, help="seed of the generated inputs (default 0)")
    out = p.add_argument_group("output")
    out.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    ext = out.add_mutually_exclusive_group()
    ext.add_argument("--external-data", dest="external_data", action="store_true", default=None,
                     help="store weights in OUTPUT.data beside the model (default: when the input did, or over 2 GB)")
    ext.add_argument("--no-external-data", dest="external_data", action="store_false",
                     help="store weights inside the .onnx file (fails over 2 GB)")
    out.add_argument("--force", action="store_true", help="overwrite the input file, or write a model that failed parity")
    out.add_argument("--quiet", "-q", action="store_true", help="print only errors and the one-line result")
    p.set_defaults(run=run)


def _max_error(text: str) -> float | str:
    return "none" if text.strip().lower() == "none" else float_arg(text)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..io import check_output_path
    from ..optimize import optimize_file
    from ..options import Options, parse_shapes
    from ..views import gate_advice, gate_miss, human_bytes, render

    if args.input is None:
        if not SAMPLE_MODEL.is_file():
            raise OptionError("no input model given, and the bundled sample is not available: pass INPUT OUTPUT")
        args.input = str(SAMPLE_MODEL)
    output = args.output or Path(args.input).name.removesuffix(".onnx") + ".lowrank.onnx"
    # every flag that names an Options field sets it: the CLI and the Python API share one vocabulary
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Options) if hasattr(args, f.name)}
    options = Options(**{**values, "skip": skip_list(args.skip), "shape": parse_shapes(args.shape)})
    check_side_outputs({"--report": args.report}, [args.input, str(output)])
    output_path = check_output_path(output, args.input, args.force)

    bar = tqdm(desc="decomposing", unit=" layers", disable=args.quiet or None, leave=False, file=sys.stderr)
    calibrating = tqdm(desc="calibrating", unit=" samples", disable=args.quiet or not args.calibration or None,
                       leave=False, file=sys.stderr)
    start = time.perf_counter()
    try:
        report = optimize_file(args.input, output_path, options, external_data=args.external_data,
                               keep_failed=args.force,
                               on_layer=lambda name: (bar.set_postfix_str(name[-40:]), bar.update()),
                               on_calibration=calibrating.update)
    finally:
        calibrating.close()
        bar.close()
    report.wall_seconds, report.peak_memory = round(time.perf_counter() - start, 2), peak_memory()
    if not args.quiet:
        print(render(report))
    if args.report:
        write_text(args.report, report.to_json() + "\n")
    if report.parity is not None and not report.parity.passed and not args.force:
        print(f"onnx-lowrank: parity FAILED: {gate_miss(report.parity)}: {output_path} not written; "
              f"{gate_advice(report.parity, calibrated=args.calibration is not None)}", file=sys.stderr)
        return 1
    verdict = "" if report.parity is None else (
        f", UNGATED: output rel_l2 {max(o.rel_l2_error for o in report.parity.outputs):.3g}" if report.parity.ungated
        else f", parity {'PASSED' if report.parity.passed else 'FAILED'}")
    if report.measured_speedup is not None:
        verdict += f", measured {report.measured_speedup:.2f}x"
    elif report.fallback:
        verdict += f"; written unchanged: {report.fallback}"
    if report.bench is not None:
        verdict += f", speedup {report.bench.speedup:.2f}x"
    cost = f"{report.wall_seconds:.1f} s" + (f", peak memory {human_bytes(report.peak_memory)}"
                                             if report.peak_memory else "")
    print(f"wrote {output_path} ({human_bytes(report.size_before)} -> {human_bytes(report.size_after)}, {cost}, "
          f"{len(report.decomposed)} of {len(report.candidates)} layers decomposed{verdict})")
    return 0 if report.parity is None or report.parity.passed else 1
