"""Text views of the report: the per-layer table, totals, parity. Pure formatting, no logic."""

from __future__ import annotations

from .report import LayerRecord, ParityResult, Report


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


def layer_table(report: Report) -> str:
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
            "decomposed" if done else f"skipped: {r.reason}",
        ])
    headers = ["layer", "op", "weight", "method", "rank", "break-even", "w.err", "params", "MACs", "result"]
    return table(headers, rows, "lllllrrrrl")


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
    rows = []
    for o in parity.outputs:
        if not o.shape_ok:
            rows.append([o.name, "x".join(map(str, o.shape)), "-", "-", "-", "-", "-", "FAILED (shape mismatch)"])
            continue
        rows.append([o.name, "x".join(map(str, o.shape)), f"{o.max_abs_error:.2e}", f"{o.max_rel_error:.2e}",
                     f"{o.rel_l2_error:.2e}", f"{o.cosine:.6f}",
                     f"{o.top1_agreement:.1%}" if o.top1_agreement is not None else "-",
                     "PASSED" if o.passed else "FAILED"])
    head = (f"parity on {parity.provider} ({parity.samples} sample{'s' * (parity.samples != 1)}, "
            f"inputs {', '.join(f'{k}:{chr(44).join(map(str, v))}' for k, v in parity.input_shapes.items())}); "
            f"pass if {parity.criterion}")
    body = table(["output", "shape", "max abs", "max rel", "rel l2", "cosine", "top-1", "result"], rows, "llrrrrrl")
    verdict = "PASSED" if parity.passed else "FAILED"
    return "\n".join([head, body, *parity.notes, f"parity {verdict}"])


def render(report: Report) -> str:
    parts = []
    if report.layers:
        parts.append(layer_table(report))
    parts.append(summary(report))
    if report.parity is not None:
        parts.append(parity_table(report.parity))
    parts.extend(report.notes)
    return "\n\n".join(parts)
