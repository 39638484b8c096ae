"""One block's refinement: Adam in fp32 on the train chunks, the held-out chunks read every few
steps, and the best held-out state kept (step 0, the closed form, included), so a block never ends
worse on held-out samples than it started."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

#: Held-out loss read every EVAL_EVERY steps; PATIENCE reads without a new best end the block.
EVAL_EVERY = 10
PATIENCE = 4


@dataclass
class Fit:
    steps: int
    best_step: int
    train_before: float
    train_after: float
    held_before: float
    held_after: float


def fit_block(parameters: list[torch.nn.Parameter], rates: list[float], loss: Callable[[int], torch.Tensor],
              train: list[int], held: list[int], steps: int, seed: int,
              on_step: Callable[[int], None] = lambda chunk: None) -> Fit:
    """Minimise `loss(chunk)` over the train chunks; `rates` are the per-parameter Adam step sizes."""
    def mean_loss(chunks: list[int]) -> float:
        with torch.no_grad():
            return float(sum(loss(c).item() for c in chunks) / len(chunks))

    optimizer = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(parameters, rates)])
    generator = torch.Generator().manual_seed(seed)
    train_before = mean_loss(train)
    best = held_before = mean_loss(held)
    best_state, best_step, since_best, taken = [p.detach().clone() for p in parameters], 0, 0, 0
    order: list[int] = []
    for step in range(1, steps + 1):
        if not order:   # one epoch: every train chunk once, in a seeded order
            order = [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]
        chunk = order.pop()
        optimizer.zero_grad(set_to_none=True)
        loss(chunk).backward()
        optimizer.step()
        on_step(chunk)
        taken = step
        if step % EVAL_EVERY and step != steps:
            continue
        current = mean_loss(held)
        if current < best:
            best, best_step, since_best = current, step, 0
            best_state = [p.detach().clone() for p in parameters]
        else:
            since_best += 1
            if since_best >= PATIENCE:
                break
    with torch.no_grad():
        for p, value in zip(parameters, best_state):
            p.copy_(value)
    return Fit(taken, best_step, train_before, mean_loss(train), held_before, best)
