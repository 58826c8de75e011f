"""The epoch loop the application tasks share (captioning, VQA, speech): the optimizer and its
one-cycle schedule, validation after every epoch, a checkpoint after every epoch, and ``--resume``
(which restores the optimizer, the schedule's position, the history and the random state; a
resumed run may be given more ``--epochs``: the schedule then stretches to the new length).

A task's recipe builds its model, batches and step, then calls :func:`train_epochs`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..training import History, fit, rng_state, set_rng_state


def train_epochs(model: torch.nn.Module, args: Any, *, task_name: str, config: dict[str, Any],
                 train_cfg: dict[str, Any], epochs: int, steps_per_epoch: int,
                 batches: Callable[[int], Any], step: Callable[[Any], torch.Tensor],
                 validate: Callable[[int], dict[str, float]], resume: Any = None,
                 weight_decay: float = 0.0, pct_start: float = 0.1,
                 state: Optional[Callable[[], dict[str, Any]]] = None,
                 restore: Optional[Callable[[dict[str, Any]], None]] = None,
                 log: Callable[[str], None] = print) -> tuple[History, Optional[dict[str, Any]], dict[str, list]]:
    """Train ``model`` for ``epochs`` epochs with AdamW (``train_cfg["lr"]``, ``weight_decay``) and a
    one-cycle schedule, ``train_cfg["grad_clip"]``, ``validate(epoch)`` after each epoch, and a
    checkpoint in ``args.out`` after each (``config`` plus the history so far).

    ``state()`` returns what else the trainer state keeps (e.g. a REINFORCE baseline) and
    ``restore(saved)`` puts it back on ``--resume``. Returns the :class:`attnkit.training.History`,
    the last trainer state and the history of every epoch so far (``loss`` and one list per
    metric, named with underscores: ``valid cer`` → ``valid_cer``)."""
    from ..checkpoint import save_checkpoint
    from .args import option

    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train_cfg["lr"],
                                                total_steps=max(1, epochs * steps_per_epoch), pct_start=pct_start)
    start_epoch, history = 0, {"loss": []}
    if resume is not None:
        st = resume.trainer_state
        opt.load_state_dict(st["optimizer"])
        # the schedule's length is this run's (--epochs may now be larger): keep the new one
        sched.load_state_dict({k: v for k, v in st["scheduler"].items()
                               if k not in ("total_steps", "_schedule_phases")})
        start_epoch, history = st["epoch"], st["history"]
        set_rng_state(st["rng"])
        if restore is not None:
            restore(st)
        log(f"resuming {str(args.out)!r} after epoch {start_epoch}")
    last: dict[str, Any] = {"trainer": None if resume is None else resume.trainer_state}

    def save(epoch: int, hist: History) -> None:
        history["loss"].append(hist.losses[-1])
        for k, v in hist.metrics[-1].items():
            history.setdefault(k.replace(" ", "_"), []).append(v)
        last["trainer"] = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1,
                           "history": history, "rng": rng_state(), **(state() if state is not None else {})}
        save_checkpoint(args.out, model=model, config={**config, "history": history}, trainer_state=last["trainer"])

    hist = fit(model, opt, batches, step, epochs=epochs, start_epoch=start_epoch,
               max_seconds=option(args, "max_seconds", None), grad_clip=train_cfg.get("grad_clip"), scheduler=sched,
               evaluate=validate, on_epoch_end=save, progress=bool(option(args, "progress", True)), desc=task_name,
               log=log)
    return hist, last["trainer"], history
