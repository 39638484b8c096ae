"""Where refinement compares the compressed model with the original, and what each block trains.

An *alignment point* is a tensor both graphs keep under one name that cuts the compressed graph:
everything computed before it that depends on a refined parameter reaches the rest of the graph
only through it. So the block after it sees its inputs in that one tensor (plus tensors no refined
parameter touches: the graph inputs, an attention mask's arithmetic, shapes), and is trained alone
on the compressed model's value there. Of the cuts, those read by two or more nodes are the
residual stream (a post-LN transformer's LayerNorm outputs, a ResNet's block outputs); where a
graph has such cuts only they bound blocks, so that a block is a sublayer whose layers compensate
each other (Q, K, V and the output projection together), else every cut does (a plain CNN: one
block per layer). The last block runs on to the model outputs, whose error joins its loss.

Pure graph analysis on ModelProtos: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

#: Ops whose output does not depend on their input's values, only on its shape.
SHAPE_OPS = ("Shape", "Size")


@dataclass(frozen=True)
class Block:
    start: str | None               # the alignment point it starts from; None: the graph inputs
    targets: tuple[str, ...]        # the tensors its loss compares with the original's
    parameters: tuple[str, ...]     # the refined initializers it holds


def alignment_blocks(reference: onnx.ModelProto, compressed: onnx.ModelProto, trainable: set[str]) -> list[Block]:
    """The blocks, in graph order, that together hold every trainable initializer of `compressed`."""
    nodes = list(compressed.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in set(node.input):
            consumers.setdefault(name, []).append(i)
    # tainted: depends on a trainable value (shapes of tainted tensors do not)
    tainted: set[str] = set()
    holds: dict[int, set[str]] = {}           # node -> trainable initializers it reads
    ancestors: list[int] = []                 # node -> bitmask of the nodes it depends on, itself included
    for i, node in enumerate(nodes):
        mask = 1 << i
        for name in node.input:
            if name in producer:
                mask |= ancestors[producer[name]]
        ancestors.append(mask)
        read = {name for name in node.input if name in trainable}
        if read:
            holds[i] = read
        if node.op_type not in SHAPE_OPS and (read or any(name in tainted for name in node.input)):
            tainted.update(out for out in node.output if out)
    outputs = [o.name for o in compressed.graph.output]
    known = {out for node in reference.graph.node for out in node.output} | {o.name for o in reference.graph.output}

    def is_cut(name: str) -> bool:
        inside = ancestors[producer[name]]
        for other in tainted:
            if other == name or not inside >> producer[other] & 1:
                continue
            if any(not inside >> j & 1 for j in consumers.get(other, ())) or other in outputs:
                return False
        return True

    candidates = [name for name in sorted(tainted, key=lambda n: producer[n]) if name in known]
    # read by two nodes that use its values (a Shape of it does not count)
    stream = [name for name in candidates if name in outputs or sum(
        nodes[j].op_type not in SHAPE_OPS for j in consumers.get(name, ())) >= 2]
    cuts = [name for name in stream if is_cut(name)] or [name for name in candidates if is_cut(name)]
    blocks: list[Block] = []
    done = 0                                  # bitmask of the nodes before the last alignment point kept
    start = None
    for name in cuts:
        inside = ancestors[producer[name]]
        if done & ~inside:
            continue                          # not downstream of the previous point: not on the stream
        params = _held(holds, inside & ~done)
        if params:
            blocks.append(Block(start, (name,), params))
            done, start = inside, name
    every = (1 << len(nodes)) - 1
    rest = _held(holds, every & ~done)
    final = tuple(o for o in outputs if o != start)
    if rest:
        blocks.append(Block(start, final, rest))
    elif blocks and final:
        last = blocks[-1]
        blocks[-1] = Block(last.start, last.targets + tuple(o for o in final if o not in last.targets), last.parameters)
    return blocks


def _held(holds: dict[int, set[str]], mask: int) -> tuple[str, ...]:
    """The trainable initializers read by the masked nodes and by no earlier block (a factor two
    layers share is trained once, in the first block that reads it)."""
    found: dict[str, None] = {}
    for i in sorted(holds):
        if mask >> i & 1:
            found.update(dict.fromkeys(sorted(holds[i])))
    for i in list(holds):
        holds[i] -= set(found)
    return tuple(found)
