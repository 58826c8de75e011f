"""The ``attnkit`` command line: ``attnkit info``, ``attnkit demo``."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Sequence


def _families() -> dict[str, list[str]]:
    import attnkit
    from attnkit import masks, normalizers, positions, scores

    mask_factories = sorted(n for n in masks.__all__ if n[0].islower() and n not in ("as_mask", "classify_dense",
                                                                                         "index_grid"))
    return {
        "scores": sorted(scores.NAMED) + sorted(scores.NEEDS_OBJECT),
        "normalizers": sorted(normalizers.NAMED),
        "masks": mask_factories,
        "positions": sorted(n for n in positions.__all__ if n not in ("as_score_mod", "FromScoreMod", "TensorBias",
                                                                       "ScoreMod")),
        "linear": sorted(n for n in getattr(_optional("attnkit.linear"), "__all__", [])),
        "nn modules": list(attnkit.nn.__all__),
        "backends": attnkit.backends.names(),
    }


def _optional(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def cmd_info(args: argparse.Namespace) -> int:
    import numpy
    import torch

    import attnkit

    print(f"attnkit {attnkit.__version__}")
    print(f"python  {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch   {torch.__version__}  threads={torch.get_num_threads()}  "
          f"cuda={'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    print(f"numpy   {numpy.__version__}")
    for name, items in _families().items():
        print(f"{name + ':':<13} {', '.join(items)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Placeholder demo until the models issue lands: every normalizer on one attention row,
    and the fast path checked against the reference."""
    import torch

    import attnkit

    torch.manual_seed(args.seed)
    B, H, T, D = 1, 2, 8, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    fast = attnkit.attention(q, k, v, mask=attnkit.masks.causal())
    ref = attnkit.attention(q, k, v, mask=attnkit.masks.causal(), backend="reference")
    print(f"causal attention, B={B} H={H} T={T} D={D}: backend "
          f"{attnkit.explain(q, k, v, mask=attnkit.masks.causal()).backend!r}, "
          f"max |fast - reference| = {(fast - ref).abs().max().item():.2e}")
    print("weights of the last query of head 0 under each normalizer (causal, T=8):")
    for name in sorted(attnkit.normalizers.NAMED):
        norm = attnkit.normalizers.NAMED[name]()
        if getattr(norm, "deterministic", True) is False:
            continue
        _, w = attnkit.attention(q, k, v, normalizer=norm, mask=attnkit.masks.causal(), return_weights=True)
        row = w[0, 0, -1]
        print(f"  {name:<10} " + " ".join(f"{x:5.2f}" for x in row.tolist()) + f"   (sum {row.sum().item():.2f})")
    ok = torch.allclose(fast, ref, atol=1e-5)
    print(f"demo result: fast path {'matches' if ok else 'DOES NOT match'} the reference")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit", description="Attention mechanisms: exact, tested, visible.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, backends and the available families").set_defaults(fn=cmd_info)
    d = sub.add_parser("demo", help="run a small attention demo")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
