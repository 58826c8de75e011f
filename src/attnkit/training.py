"""A small, explicit training loop shared by every task: seeding, thread count, progress bars,
a wall-clock budget, gradient clipping, per-epoch evaluation and checkpointing; and
:func:`format_metrics`, the one way the command line prints metrics (``attnkit train`` and
``attnkit eval`` alike: ``test exact match: 99.85% (2000 examples, greedy)``).

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

import contextlib
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


class RankFinished(Exception):
    """Raised by :func:`fit` on a rank other than 0, once training is over, inside
    :func:`main_rank_finishes`: what follows training (the final test, the last checkpoint) is rank
    0's alone."""


_main_finishes: list[bool] = []


@contextlib.contextmanager
def main_rank_finishes():
    """Within the block, :func:`fit` under several ranks ends ranks other than 0 with
    :class:`RankFinished` after the last epoch (its checkpoint written), so that a task's final
    evaluation runs on rank 0 only (``attnkit train`` under ``torchrun`` uses it; other ranks
    would repeat the evaluation, and on another machine could not read rank 0's checkpoint)."""
    _main_finishes.append(True)
    try:
        yield
    finally:
        _main_finishes.pop()


@dataclass
class History:
    """What :func:`fit` did: mean loss and metrics per epoch, steps, time, and why it stopped."""

    losses: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "epochs"  # "epochs" | "time"
    stop_message: str = ""  # with stopped == "time": the line fit logs, e.g. "training stopped at the time limit ..."


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Callable[[int], Iterable[Batch]],
        step: Callable[[Batch], torch.Tensor], *, epochs: int, start_epoch: int = 0,
        max_seconds: float | None = None, grad_clip: float | None = None,
        scheduler: Any = None, evaluate: Callable[[int], dict[str, float]] | None = None,
        on_epoch_end: Callable[[int, History], None] | None = None, progress: bool = True,
        desc: str = "train", log: Callable[[str], None] | None = print,
        data_parallel: bool | None = None, split: str = "rows") -> History:
    """Train ``model`` for ``epochs`` epochs (or until ``max_seconds`` of wall time have passed).

    Under ``torch.distributed`` (``torchrun``; :mod:`attnkit.distributed.data_parallel`) every rank
    runs ``fit`` with the same ``batches``: each global batch is split over the ranks by rows, the
    ranks' gradients are summed after the backward (each rank's loss weighted by its share of the
    batch), so R ranks train as one process on the same global batch; rank 0 alone logs, shows
    progress and evaluates (its metrics reach every rank's ``on_epoch_end``).

    Args:
        batches: ``batches(epoch)`` yields the epoch's batches (shuffle inside it, seeded by epoch).
        step: ``step(batch) -> loss`` (a scalar tensor, the batch's mean loss), or ``(loss, count)``
            where ``count`` is what the mean runs over (e.g. non-padding tokens) when that is not the
            batch's rows; ``fit`` does backward, clipping and the update.
        scheduler: stepped after every optimizer step (per-step schedules such as warmup).
        evaluate: ``evaluate(epoch) -> metrics`` after each epoch (model in eval mode, no grad).
        on_epoch_end: called after evaluation, e.g. to save a checkpoint.
        progress: show a tqdm bar (disabled automatically when stderr is not a terminal).
        data_parallel: split the batches over the ranks of the initialized process group (default:
            when one of more than one rank is initialized); False trains this process alone.
        split: with several ranks, ``"rows"`` (default) hands each rank its rows of every batch;
            ``"none"`` hands every rank the whole batch, its ``step`` taking its own part (e.g. a
            shard of each sequence for context parallelism) and returning ``(loss, count)``.
    """
    from tqdm.auto import tqdm

    if split not in ("rows", "none"):
        raise ValueError(f"split must be 'rows' or 'none'; got {split!r}")
    ranks = _Ranks.start(model, data_parallel, split)
    if not ranks.main:
        progress, log = False, None
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
            optimizer.zero_grad(set_to_none=True)
            if ranks.parallel:
                value, out_of_time = ranks.step(model, step, batch, max_seconds is not None
                                                and time.perf_counter() - start > max_seconds)
                if value is None:
                    raise FloatingPointError(f"loss became non-finite on a rank at epoch {epoch + 1}, step {hist.steps}")
            else:
                loss = step(batch)
                loss = loss[0] if isinstance(loss, tuple) else loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, step {hist.steps}")
                loss.backward()
                value = loss.item()
                out_of_time = max_seconds is not None and time.perf_counter() - start > max_seconds
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            hist.steps += 1
            total += value
            count += 1
            if count % 10 == 0:
                bar.set_postfix(loss=f"{total / count:.4f}")
            if out_of_time:
                hist.stopped = "time"
                break
        bar.close()
        if hist.stopped == "time":
            where = (f"after epoch {epoch + 1}/{epochs}" if n is not None and count >= n else
                     f"in epoch {epoch + 1}/{epochs}, after step {count}" + (f" of {n}" if n is not None else ""))
            hist.stop_message = (f"training stopped at the time limit (--max-seconds {max_seconds:g}) {where} "
                                 f"({hist.steps} step{'' if hist.steps == 1 else 's'} in all)")
        hist.losses.append(total / max(count, 1))
        metrics: dict[str, float] = {}
        if evaluate is not None and ranks.main:
            model.eval()
            with torch.no_grad():
                metrics = evaluate(epoch)
        hist.metrics.append(ranks.from_main(metrics))
        hist.seconds = time.perf_counter() - start
        if log is not None:
            shown = "  ".join(f"{metric_name(k)} {format_value(k, v)}" for k, v in metrics.items())
            log(f"epoch {epoch + 1}/{epochs}  loss {hist.losses[-1]:.4f}  {shown}  ({hist.seconds:.0f}s)".rstrip())
        if on_epoch_end is not None:
            on_epoch_end(epoch, hist)
        ranks.barrier()  # rank 0's checkpoint of this epoch is written before any rank goes on
        if hist.stopped == "time":
            if log is not None:
                log(hist.stop_message)
            break
    hist.seconds = time.perf_counter() - start
    if ranks.parallel and not ranks.main and _main_finishes:
        raise RankFinished(f"rank {ranks.rank}: training is over; rank 0 finishes the run")
    return hist


class _Ranks:
    """The process group :func:`fit` trains over (one process: nothing to do)."""

    def __init__(self, dp=None, split: str = "rows"):
        self.dp, self.split = dp, split
        self.parallel = dp is not None
        self.rank = dp.dist.get_rank() if dp is not None else 0
        self.world = dp.dist.get_world_size() if dp is not None else 1
        self.main = self.rank == 0

    @classmethod
    def start(cls, model: torch.nn.Module, wanted: bool | None, split: str) -> "_Ranks":
        dist = torch.distributed
        group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if wanted and not group:
            raise RuntimeError("fit(data_parallel=True) needs an initialized process group of more than one rank "
                               "(torchrun, or torch.distributed.init_process_group)")
        if not group or wanted is False:
            return cls()
        from .distributed import data_parallel as dp

        dp.broadcast_parameters(model)
        return cls(dp, split)

    def step(self, model: torch.nn.Module, step: Callable, batch: Batch, out_of_time: bool
             ) -> tuple[Optional[float], bool]:
        """This rank's share of ``batch``: its loss weighted by its share of the global count, the
        backward, the gradients summed over ranks. Returns the global batch's mean loss (None if
        a rank's loss was not finite) and whether rank 0 ran out of time."""
        part, rows = self.dp.split_batch(batch, self.rank, self.world) if self.split == "rows" else (batch, 1)
        loss, n = None, 0.0
        if rows:
            out = step(part)
            loss, n = (out[0], float(out[1])) if isinstance(out, tuple) else (out, float(rows))
        bad = 0.0 if loss is None or bool(torch.isfinite(loss)) else 1.0
        total, bad = self.dp.all_sum([n, bad])
        if bad:
            return None, out_of_time
        weighted = 0.0
        if loss is not None:  # (also with n = 0: a step whose backward communicates needs every rank)
            (loss * (n / total)).backward()
            weighted = loss.item() * n / total
        self.dp.sum_gradients(model.parameters())
        value, late = self.dp.all_sum([weighted, float(out_of_time and self.main)])
        return value, late > 0

    def barrier(self) -> None:
        if self.parallel:
            self.dp.dist.barrier()

    def from_main(self, metrics: dict[str, float]) -> dict[str, float]:
        if not self.parallel:
            return metrics
        box = [metrics]
        self.dp.dist.broadcast_object_list(box, src=0)
        return box[0]


#: metric names (or their endings) whose values are fractions, printed as percentages
FRACTIONS = ("accuracy", "exact match", "CER", "WER", "monotonic")
#: metrics already on a 0-100 scale (two decimals, no percent sign, as sacreBLEU prints them)
PERCENT_SCALE = ("BLEU", "chrF")
#: counts and settings: printed in parentheses after the metrics, e.g. "(360 examples, greedy)"
COUNTS = ("examples", "sentences", "questions", "images", "utterances", "dates", "numbers")
SETTINGS = ("beam", "signature")
_NAMES = {"bleu": "BLEU", "chrf": "chrF", "ppl": "perplexity", "s": "seconds", "cer": "CER", "wer": "WER"}


def metric_name(key: str) -> str:
    """A metric's key as people read it: ``test_exact_match`` -> ``test exact match``,
    ``valid_bleu`` -> ``valid BLEU``."""
    return " ".join(_NAMES.get(w, w) for w in str(key).replace("_", " ").split())


def format_value(key: str, value: Any) -> str:
    """One metric value as people read it: fractions (:data:`FRACTIONS`) as percentages with two
    decimals (``0.9985`` -> ``99.85%``), BLEU and chrF with two decimals, other numbers with two
    decimals (four below 1), ints as they are, NaN as ``n/a``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "n/a"
    name = metric_name(key)
    if name.endswith(FRACTIONS):
        return f"{100 * value:.2f}%"
    if name.endswith(PERCENT_SCALE):
        return f"{value:.2f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def format_metrics(metrics: dict[str, Any], notes: Iterable[str] = ()) -> str:
    """The one line ``attnkit train`` ends with and ``attnkit eval`` prints, from a metrics dict
    (keys as ``evaluate`` returns them; counts and settings go in parentheses, then ``notes``).
    ``attnkit eval --json`` prints the dict itself.

    Example::

        >>> format_metrics({"test_exact_match": 0.9985, "examples": 2000, "beam": 1})
        'test exact match: 99.85% (2000 examples, greedy)'
        >>> format_metrics({"test BLEU": 31.2041, "test chrF": 55.1, "sentences": 1000, "beam": 4})
        'test BLEU: 31.20, test chrF: 55.10 (1000 sentences, beam 4)'
    """
    shown, extra = [], []
    for key, value in metrics.items():
        name = metric_name(key)
        if name in COUNTS:
            extra.append(f"{value} {name}")
        elif name == "beam":
            extra.append("greedy" if value == 1 else f"beam {value}")
        elif name in SETTINGS:
            extra.append(f"{name} {value}")
        else:
            shown.append(f"{name}: {format_value(key, value)}")
    extra += list(notes)
    return ", ".join(shown) + (f" ({', '.join(extra)})" if extra else "")
