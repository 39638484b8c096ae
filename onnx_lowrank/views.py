"""Text views of the report: the per-layer table, totals, parity, bench. Pure formatting, no logic."""

from __future__ import annotations

import math

from .report import BenchResult, LayerRecord, OutputComparison, ParityResult, Report


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A plain aligned table; align holds one 'l' or 'r' per column (numbers right)."""
    align = align or "l" * len(headers)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _macs(record: LayerRecord, after: bool) -> str:
    total = record.total_macs(after)
    per = record.macs_after if after else record.macs_before
    return human_count(total if total is not None else per)


def _latency(record: LayerRecord) -> str:
    if record.latency_dense_ms is None:
        return "-"
    return f"{record.latency_dense_ms:.3f} -> {record.latency_factorized_ms:.3f}"


def layer_table(report: Report) -> str:
    measured = any(r.latency_dense_ms is not None for r in report.layers)
    calibrated = any(r.activation_error is not None for r in report.layers)
    rows = []
    for r in report.layers:
        done = r.decomposed
        rows.append([
            r.name, r.op, "x".join(map(str, r.weight_shape)),
            r.method or "-", "x".join(map(str, r.rank)) if r.rank else "-",
            f"{r.break_even_rank:.0f}" if r.break_even_rank is not None else "-",
            f"{r.weight_error:.1e}" if r.weight_error is not None else "-",
            f"{human_count(r.params_before)} -> {human_count(r.params_after)}" if done else human_count(r.params_before),
            f"{_macs(r, False)} -> {_macs(r, True)}" if done else _macs(r, False),
            f"skipped: {r.reason}" if r.status == "skipped" else (r.status if done else r.reason or r.status),
        ])
        if done and (r.decision or r.reason):   # what the measurements decided, the alternatives refused
            rows[-1][-1] += ": " + "; ".join(filter(None, [r.decision, r.reason]))
        if calibrated:   # the error on the calibration inputs, which the truncation minimised
            rows[-1].insert(7, f"{r.activation_error:.1e}" if r.activation_error is not None else "-")
        if measured:
            rows[-1].insert(-1, _latency(r))
    headers = ["layer", "op", "weight", "method", "rank", "break-even", "w.err", *(["act.err"] if calibrated else []),
               "params", "MACs", *(["ms dense -> lowrank"] if measured else []), "result"]
    return table(headers, rows, "lllllrr" + "r" * calibrated + "rrr" + "r" * measured + "l")


def summary(report: Report) -> str:
    t = report.totals()
    lines = [f"decomposed {t['decomposed']} of {t['candidates']} candidate layers"
             + "".join(f"; {name}: {count}" for name, count in report.passes.items() if count)]
    lines.append(f"parameters {human_count(t['params_before'])} -> {human_count(t['params_after'])}, "
                 f"size {human_bytes(t['size_before'])} -> {human_bytes(t['size_after'])}")
    if t["layer_macs_before"]:
        lines.append(f"MACs in candidate layers {human_count(t['layer_macs_before'])} -> "
                     f"{human_count(t['layer_macs_after'])} "
                     f"({t['layer_macs_before'] / max(t['layer_macs_after'], 1):.2f}x fewer)")
    return "\n".join(lines)


def parity_table(parity: ParityResult) -> str:
    per_output = len({o.criterion for o in parity.outputs}) > 1   # some output has its own tolerance
    rows = []
    for o in parity.outputs:
        tolerance = [o.criterion] if per_output else []
        if not o.shape_ok:
            rows.append([o.name, "x".join(map(str, o.shape)), "-", "-", "-", "-", "-", *tolerance,
                         "FAILED (shape mismatch)"])
            continue
        rows.append([o.name, "x".join(map(str, o.shape)), f"{o.max_abs_error:.2e}", f"{o.max_rel_error:.2e}",
                     f"{o.rel_l2_error:.2e}", f"{o.cosine:.6f}",
                     f"{o.top1_agreement:.1%}" if o.top1_agreement is not None else "-", *tolerance,
                     "measured" if parity.ungated else "PASSED" if o.passed else "FAILED"])
    # parity.samples counts runs, each a batch of the input shapes shown
    head = (f"parity on {parity.provider} ({parity.samples} run{'s' * (parity.samples != 1)}, "
            f"inputs {', '.join(f'{k}:{chr(44).join(map(str, v))}' for k, v in parity.input_shapes.items())}); "
            f"pass if {parity.criterion}")
    headers = ["output", "shape", "max abs", "max rel", "rel l2", "cosine", "top-1", *(["pass if"] * per_output), "result"]
    body = table(headers, rows, "llrrrrr" + "l" * per_output + "l")
    failures = [f"FAILED {o.name}: {failure_detail(o)}" for o in parity.outputs if not o.passed]
    verdict = "UNGATED (measured only: --max-error none)" if parity.ungated else "PASSED" if parity.passed else "FAILED"
    return "\n".join([head, body, *failures, *parity.notes, f"parity {verdict}"])


def failure_detail(o: OutputComparison) -> str:
    """By how much an output missed its tolerance, in that tolerance's terms."""
    if not o.shape_ok:
        return f"shape {o.shape} differs from the reference's {o.reference_shape}"
    if o.mismatched is not None:
        size = max(1, math.prod(o.shape))
        return (f"{o.mismatched} of {size} elements ({o.mismatched / size:.1%}) outside {o.criterion}; "
                f"max abs error {o.max_abs_error:.3e}")
    misses = []
    if o.bound is not None and o.rel_l2_error > o.bound:
        misses.append(f"rel_l2 {o.rel_l2_error:.3e} > {o.bound:.1e} ({o.rel_l2_error / o.bound:.3g}x the bound)")
    if o.top1_missed and o.top1_lower is not None:
        misses.append(f"top-1 agreement {o.top1_agreement:.3f}, at least {o.top1_lower:.3f} with 90% confidence, "
                      f"< {o.min_top1:g} (more held-out samples show more)")
    elif o.top1_missed:
        misses.append(f"top-1 agreement {o.top1_agreement:.3f} < {o.min_top1:g}")
    if misses:
        return "; ".join(misses)
    return "non-finite values (NaN or inf) where the reference has finite ones, or the other way"


def gate_miss(parity: ParityResult) -> str:
    """The failing outputs in one line: by how much each missed."""
    return "; ".join(f"{o.name}: {failure_detail(o)}" for o in parity.outputs if not o.passed)


def gate_advice(parity: ParityResult, calibrated: bool) -> str:
    """What would meet the gate, in flags."""
    worst = max((o.rel_l2_error for o in parity.outputs if math.isfinite(o.rel_l2_error)), default=None)
    loosen = (f"--max-error {_round_up(worst)} accepts this error" if worst is not None and worst > 0
              else "loosen --max-error")
    top1 = [o.top1_judged for o in parity.outputs if o.top1_missed]
    if top1:
        loosen += f" (with --min-top1 {math.floor(min(top1) * 100) / 100:g})"
    ways = ["a less lossy rank rule or target"]
    if not calibrated:
        ways.insert(0, "--calibration SAMPLES.npz (data-aware ranks, backed off on held-out samples until the gate holds)")
    return f"to meet it: {', or '.join(ways)}; {loosen}; or --force writes it anyway"


def _round_up(value: float) -> str:
    """Two significant digits, rounded up: a bound the measured error meets."""
    exponent = math.floor(math.log10(value)) - 1
    return f"{math.ceil(value / 10 ** exponent) * 10 ** exponent:.2g}"


def bench_table(result: BenchResult) -> str:
    s = result.settings
    shapes = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in result.input_shapes.items())
    head = (f"bench on {result.provider} (inputs {shapes}; graph optimizations {s.get('graph_optimizations')}, "
            f"intra-op spinning {'on' if s.get('intra_op_spinning') else 'off'})\n"
            f"{s.get('blocks')} blocks of ~{s.get('block_ms', 0):.0f} ms per model"
            + (", interleaved A B / B A" if s.get("interleaved") else ""))
    tags = ["A  ", "B  "][:len(result.compared)] if len(result.models) > 1 else [""]
    if result.baseline is not None:
        tags.append("-  ")
    rows = [[tags[i] + m.model, f"{m.median_ms:.3f} ms",
             f"{m.p10_ms:.3f} ms", f"{m.p90_ms:.3f} ms", str(m.runs_per_block), human_count(round(m.throughput))]
            for i, m in enumerate(result.models)]
    body = table(["model", "median", "p10", "p90", "runs/block", "samples/s"], rows, "lrrrrr")
    lines = [head, body]
    if result.speedup is not None:
        lines.append(f"speedup A/B {result.speedup:.3f}x (95% CI {result.speedup_ci_low:.3f}x-"
                     f"{result.speedup_ci_high:.3f}x; per block pair p10 {result.speedup_p10:.3f}x, "
                     f"p90 {result.speedup_p90:.3f}x)")
    if result.baseline is not None:
        b = result.baseline
        lines.append(f"{b.label} ({b.how}): {b.over_a:.3f}x over A"
                     + (f"; B over {b.label} {b.b_over:.3f}x (95% CI {b.b_over_ci_low:.3f}x-{b.b_over_ci_high:.3f}x)"
                        if b.b_over is not None else ""))
    if result.profile is not None:
        lines.append(profile_table(result))
    lines.extend(result.notes)
    return "\n".join(lines)


def profile_table(result: BenchResult, limit: int = 15) -> str:
    """Kernel time per original layer; rows beyond `limit` are summed into one."""
    pair = len(result.compared) == 2
    names = ["A ms", "B ms"] if pair else ["ms"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    rows = []
    for r in result.profile[:limit]:
        rows.append([r.layer, ",".join(r.ops), *map(ms, r.ms), *([ratio(*r.ms)] if pair else []),
                     "decomposed" if r.decomposed else ""])
    rest = result.profile[limit:]
    totals = [sum(r.ms[i] or 0.0 for r in result.profile) for i in range(len(names))]
    if rest:
        other = [sum(r.ms[i] or 0.0 for r in rest) for i in range(len(names))]
        rows.append([f"({len(rest)} more layers)", "", *map(ms, other), *([ratio(*other)] if pair else []), ""])
    rows.append(["total", "", *map(ms, totals), *([ratio(*totals)] if pair else []), ""])
    head = (f"kernel time per layer and run (ORT profiler, {result.settings.get('profile_runs', '?')} runs; "
            "a factorized layer's nodes are summed into its row)")
    return "\n".join([head, table(["layer", "ops", *names, *(["A/B"] * pair), ""],
                                   rows, "ll" + "r" * (len(names) + pair) + "l")])


def render(report: Report) -> str:
    parts = []
    if report.layers:
        parts.append(layer_table(report))
    parts.append(summary(report))
    if report.parity is not None:
        parts.append(parity_table(report.parity))
    if report.bench is not None:
        parts.append(bench_table(report.bench))
    parts.extend(report.notes)
    return "\n\n".join(parts)


def analysis_table(analysis) -> str:
    """`analyze`: per layer the spectrum summary, break-even rank, and at each error level the rank
    with its predicted (MACs) and, when measured, measured speedup."""
    from .analysis import ERROR_LEVELS

    measured = any(p.measured_speedup is not None for layer in analysis.layers for p in layer.points)
    rows = []
    for layer in analysis.layers:
        cells = []
        for p in layer.points:
            cell = f"{p.rank}: {p.predicted_speedup:.2f}x"
            if measured:
                cell += f" ({p.measured_speedup:.2f}x)" if p.measured_speedup is not None else " (-)"
            cells.append(cell)
        rows.append([layer.name, layer.op, "x".join(map(str, layer.weight_shape)), layer.form, str(layer.full_rank),
                     f"{layer.stable_rank:.1f}", f"{layer.break_even_rank:.0f}", *cells])
    headers = ["layer", "op", "weight", "form", "full rank", "stable rank", "break-even",
               *[f"err<={level:g}" for level in ERROR_LEVELS]]
    legend = ("each err<=E cell: the smallest rank within relative weight error E: speedup in MACs"
              + (" (measured in ONNX Runtime, the layer alone)" if measured else "")
              + "; below 1x the factorized layer costs more than the dense one")
    return "\n".join([table(headers, rows, "lllrrrr" + "r" * len(ERROR_LEVELS)), legend])


def sweep_table(result) -> str:
    """`sweep`: one row per target; the chosen point (fastest within --max-error) marked with *."""
    metric = result.metric_before is not None
    rows = []
    for i, p in enumerate(result.points):
        speedup = "-" if p.speedup is None else (f"{p.speedup:.2f}x ({p.speedup_ci_low:.2f}-{p.speedup_ci_high:.2f})"
                                                 if p.speedup_ci_low is not None else f"{p.speedup:.2f}x")
        rows.append(["*" if i == result.best else "", p.label or f"{p.target:g}", f"{p.decomposed}/{p.candidates}",
                     "-" if p.macs_ratio is None else f"{p.macs_ratio:.2f}", human_count(p.params),
                     "-" if p.output_error is None else f"{p.output_error:.2e}", speedup,
                     *([("-" if p.metric is None else f"{p.metric:.4g}")] if metric else []),
                     p.model or ""])
    headers = ["", f"target {result.target_kind}", "decomposed", "layer MACs", "params", "output error",
               "speedup (95% CI)", *(["metric"] if metric else []), "model"]
    lines = [table(headers, rows, "lrrrrrr" + "r" * metric + "l"),
             f"params before {human_count(result.params_before)}"
             + (f"; metric of the original {result.metric_before:.4g}" if metric else "")]
    best = result.best_point
    if best is not None:
        within = f"within --max-error {result.max_error:g}" if result.max_error is not None else "of all points"
        lines.append(f"fastest {within}: target {result.target_kind} {best.target:g}, {best.speedup:.2f}x at output "
                     f"error {best.output_error:.2e}" + (f" ({best.model})" if best.model else ""))
    elif result.max_error is not None:
        lines.append(f"no point is within --max-error {result.max_error:g}")
    return "\n".join(lines)
