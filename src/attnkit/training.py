"""A small, explicit training loop shared by every task: seeding, thread count, progress bars,
a wall-clock budget, gradient clipping, per-epoch evaluation and checkpointing.

Example::

    >>> import torch
    >>> from attnkit.training import fit, seed_everything
    >>> seed_everything(0)
    >>> model = torch.nn.Linear(1, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> data = [(torch.tensor([[1.0]]), torch.tensor([[2.0]]))] * 20
    >>> def step(batch):
    ...     x, y = batch
    ...     return torch.nn.functional.mse_loss(model(x), y)
    >>> hist = fit(model, opt, lambda epoch: data, step, epochs=3, progress=False, log=None)
    >>> hist.losses[-1] < hist.losses[0]
    True
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

Batch = Any


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def set_threads(n: Optional[int]) -> None:
    """Set torch's intra-op threads (None leaves the default)."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1; got {n}")
        torch.set_num_threads(n)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@dataclass
class History:
    """What :func:`fit` did: mean loss and metrics per epoch, steps, time, and why it stopped."""

    losses: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "epochs"  # "epochs" | "time"


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Callable[[int], Iterable[Batch]],
        step: Callable[[Batch], torch.Tensor], *, epochs: int, start_epoch: int = 0,
        max_seconds: float | None = None, grad_clip: float | None = None,
        scheduler: Any = None, evaluate: Callable[[int], dict[str, float]] | None = None,
        on_epoch_end: Callable[[int, History], None] | None = None, progress: bool = True,
        desc: str = "train", log: Callable[[str], None] | None = print) -> History:
    """Train ``model`` for ``epochs`` epochs (or until ``max_seconds`` of wall time have passed).

    Args:
        batches: ``batches(epoch)`` yields the epoch's batches (shuffle inside it, seeded by epoch).
        step: ``step(batch) -> loss`` (a scalar tensor); ``fit`` does backward, clipping and the update.
        scheduler: stepped after every optimizer step (per-step schedules such as warmup).
        evaluate: ``evaluate(epoch) -> metrics`` after each epoch (model in eval mode, no grad).
        on_epoch_end: called after evaluation, e.g. to save a checkpoint.
        progress: show a tqdm bar (disabled automatically when stderr is not a terminal).
    """
    from tqdm.auto import tqdm

    hist = History()
    start = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        model.train()
        total, count = 0.0, 0
        items = batches(epoch)
        n = len(items) if hasattr(items, "__len__") else None
        bar = tqdm(items, total=n, desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress or None,
                   leave=False, dynamic_ncols=True)
        for batch in bar:
            loss = step(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, step {hist.steps}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            hist.steps += 1
            total += loss.item()
            count += 1
            if count % 10 == 0:
                bar.set_postfix(loss=f"{total / count:.4f}")
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                hist.stopped = "time"
                break
        bar.close()
        hist.losses.append(total / max(count, 1))
        metrics: dict[str, float] = {}
        if evaluate is not None:
            model.eval()
            with torch.no_grad():
                metrics = evaluate(epoch)
        hist.metrics.append(metrics)
        hist.seconds = time.perf_counter() - start
        if log is not None:
            shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            log(f"epoch {epoch + 1}/{epochs}  loss {hist.losses[-1]:.4f}  {shown}  ({hist.seconds:.0f}s)".rstrip())
        if on_epoch_end is not None:
            on_epoch_end(epoch, hist)
        if hist.stopped == "time":
            break
    hist.seconds = time.perf_counter() - start
    return hist


def _fmt(v: float) -> str:
    return f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else str(v)
