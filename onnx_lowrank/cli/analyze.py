"""`onnx-lowrank analyze IN`: each candidate layer's spectrum, break-even rank and speedups; no model written."""

from __future__ import annotations

import argparse

from ..options import DEFAULT_CACHE_DIR
from .common import add_layer_selection, check_side_outputs, int_arg, require_matplotlib, skip_list, write_text


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="show what decomposition could do to each layer, without writing a model",
                       description="For every weight-carrying MatMul / Gemm / Conv (after BatchNorm folding and "
                                   "merging, as optimize sees them): the relative weight error by rank, the break-even "
                                   "rank, and the rank and speedup at a few error levels, predicted from MACs and, "
                                   "with --measure, measured in ONNX Runtime.")
    p.add_argument("input", help="model (.onnx)")
    p.add_argument("--plot", metavar="FILE.png", help="write relative weight error against rank per layer, "
                                                      "break-even marked (needs matplotlib: pip install 'onnx-lowrank[plot]')")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--measure", action="store_true", default=False,
                   help="also time each layer alone in ONNX Runtime, dense and factorized at those ranks")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, metavar="DIR",
                   help="measured latencies are kept here (default %(default)s)")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                   help="ONNX Runtime execution provider for --measure (default cpu)")
    sel = p.add_argument_group("which layers, at which shapes")
    add_layer_selection(sel, "normalize passes not to run first")
    sel.add_argument("--shape", action="append", metavar="NAME:D1,D2,...",
                     help="input shape (repeatable); dynamic dims default to --batch first, 16 elsewhere")
    sel.add_argument("--batch", type=int_arg, default=4, help="value for dynamic batch dims (default 4)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis import analyze_model, plot_analysis
    from ..options import Options, parse_shapes
    from ..report import to_json
    from ..views import analysis_table

    if args.plot:
        require_matplotlib()
    check_side_outputs({"--plot": args.plot, "--json": args.json}, [args.input])
    options = Options(ops=args.ops, include=args.include, exclude=args.exclude,
                      skip=skip_list(args.skip), shape=parse_shapes(args.shape), batch=args.batch,
                      measure=args.measure, cache_dir=args.cache_dir, provider=args.provider, validate=False)
    analysis = analyze_model(args.input, options)
    if not analysis.layers:
        print("no candidate layers: no MatMul, Gemm or Conv (group 1) with a constant weight")
    else:
        print(analysis_table(analysis))
    for note in analysis.notes:
        print(note)
    if args.json:
        write_text(args.json, to_json(analysis) + "\n")
    if args.plot and analysis.layers:
        panels = plot_analysis(analysis, args.plot)
        print(f"wrote {args.plot} ({panels} layer{'s' * (panels != 1)})")
    return 0
