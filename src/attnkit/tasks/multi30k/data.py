"""The multi30k task's data: Multi30k's folder layout and explicit split files
(:func:`resolve_files`), parallel text files read and checked (:func:`read_lines`,
:func:`read_parallel`), sentences encoded to token ids (:func:`encode_split`) and batched by
length within a token budget (:func:`token_batches`, :func:`make_batch`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..args import option
from ..io import check_path, read_text_lines
from ..vocab import pad_batch

Tensor = torch.Tensor

DEFAULT_DATA = Path("..") / "shared" / "data" / "multi30k"
SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
SPLIT_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "dev": "valid", "test": "test",
                 "test2016": "test", "test_2016_flickr": "test"}
WHERE = ("Multi30k comes from https://github.com/multi30k/dataset (data/task1/raw/*.gz and "
         "data/task1/tok/*.lc.norm.tok.*); give its folder with --data DIR, or give the files with "
         "--train-src/--train-tgt/--valid-src/--valid-tgt/--test-src/--test-tgt")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def read_lines(path: str | Path, option: str = "file") -> list[str]:
    """The lines of a UTF-8 text file, plain or gzipped (without their line ends).

    Raises ``ValueError`` naming ``option`` and the path when the file is missing, unreadable,
    not UTF-8 (with the line), or has no lines. Lines end at ``\\n`` (``\\r\\n`` too), so
    line ``i`` is what editors and ``wc -l`` call line ``i``.
    """
    p = check_path(option, path)
    lines = read_text_lines(p, f"{option}: {str(p)!r}")
    if not lines or all(not s.strip() for s in lines):
        raise ValueError(f"{option}: {str(p)!r} is empty (expected one sentence per line)")
    return lines


def read_parallel(src_path: str | Path, tgt_path: str | Path, split: str = "train") -> tuple[list[str], list[str]]:
    """Aligned source and target lines; ``ValueError`` when their line counts differ."""
    src = read_lines(src_path, f"--{split}-src")
    tgt = read_lines(tgt_path, f"--{split}-tgt")
    if len(src) != len(tgt):
        raise ValueError(f"{split} files are not parallel: source {str(src_path)!r} has {len(src)} lines but target "
                         f"{str(tgt_path)!r} has {len(tgt)} (line i of one must translate line i of the other)")
    return src, tgt


def _find(folder: Path, stem: str, lang: str, raw: bool) -> Path | None:
    if raw:
        names = [f"raw/{stem}.{lang}.gz", f"raw/{stem}.{lang}", f"{stem}.{lang}.gz", f"{stem}.{lang}"]
    else:
        names = [f"tok/{stem}.lc.norm.tok.{lang}", f"tok/{stem}.lc.norm.tok.{lang}.gz", f"{stem}.{lang}",
                 f"{stem}.{lang}.gz"]
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def resolve_files(args: argparse.Namespace, splits: Sequence[str] = ("train", "valid", "test"),
                  required: Sequence[str] = ("train", "valid")) -> dict[str, tuple[Path, Path]]:
    """``{split: (source file, target file)}`` from ``--data/--src/--tgt/--raw`` and the explicit
    ``--{split}-src/--{split}-tgt`` options (which win). Splits in ``required`` must be found."""
    src, tgt = option(args, "src", "en"), option(args, "tgt", "de")
    raw = bool(option(args, "raw", False))
    folder = option(args, "data", None)
    folder = Path(folder) if folder is not None else DEFAULT_DATA
    out: dict[str, tuple[Path, Path]] = {}
    missing_folder = False
    for split in splits:
        explicit = (option(args, f"{split}_src", None), option(args, f"{split}_tgt", None))
        if (explicit[0] is None) != (explicit[1] is None):
            given = f"--{split}-src" if explicit[0] is not None else f"--{split}-tgt"
            other = f"--{split}-tgt" if explicit[0] is not None else f"--{split}-src"
            raise ValueError(f"{given} was given without {other}: give both files of the {split} split")
        if explicit[0] is not None:
            for opt, p in zip((f"--{split}-src", f"--{split}-tgt"), explicit):
                check_path(opt, p)
            out[split] = (Path(explicit[0]), Path(explicit[1]))
            continue
        if not folder.is_dir():
            missing_folder = True
            continue
        s, t = _find(folder, SPLITS[split], src, raw), _find(folder, SPLITS[split], tgt, raw)
        if s is not None and t is not None:
            out[split] = (s, t)
        elif split in required:
            layout = (f"raw/{SPLITS[split]}.{{{src},{tgt}}}.gz" if raw
                      else f"tok/{SPLITS[split]}.lc.norm.tok.{{{src},{tgt}}}")
            raise ValueError(f"--data: {str(folder)!r} has no {split} files for --src {src} --tgt {tgt} "
                             f"(looked for {layout}{'' if raw else ' (pass --raw for the raw/ files)'}). {WHERE}")
    for split in required:
        if split not in out:
            if missing_folder:
                raise ValueError(f"--data: no such folder {str(folder)!r} (resolved from {str(Path.cwd())!r}). {WHERE}")
            raise ValueError(f"no {split} files: {WHERE}")
    return out


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
def token_batches(src_lengths: Sequence[int], tgt_lengths: Sequence[int], max_tokens: int, *,
                  shuffle: bool, seed: int = 0, max_sentences: int | None = None) -> list[list[int]]:
    """Indices cut into batches of sentences of similar length, each holding at most
    ``max_tokens`` padded tokens (``n · max(longest source, longest target)``; a single longer
    pair still gets a batch of its own). With ``shuffle``, equal lengths are ordered at random
    and the batches are shuffled, both from ``seed``.

    Example::

        >>> token_batches([3, 3, 5, 9], [4, 2, 5, 9], max_tokens=10, shuffle=False)
        [[1, 0], [2], [3]]
    """
    import random

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1; got {max_tokens!r}")
    n = len(src_lengths)
    rng = random.Random(seed)
    noise = [rng.random() for _ in range(n)] if shuffle else [0.0] * n
    order = sorted(range(n), key=lambda i: (tgt_lengths[i], src_lengths[i], noise[i]))
    batches, cur, longest = [], [], 0
    for i in order:
        need = max(longest, src_lengths[i], tgt_lengths[i])
        if cur and (need * (len(cur) + 1) > max_tokens or (max_sentences and len(cur) >= max_sentences)):
            batches.append(cur)
            cur, need = [], max(src_lengths[i], tgt_lengths[i])
        cur.append(i)
        longest = need
    if cur:
        batches.append(cur)
    if shuffle:
        rng.shuffle(batches)
    return batches


@dataclass
class Encoded:
    """A split as token ids: ``src[i]`` ends with EOS; ``tgt[i]`` is ``BOS … EOS``."""

    src: list[list[int]]
    tgt: list[list[int]]

    def __len__(self) -> int:
        return len(self.src)


def encode_split(src_lines: Sequence[str], tgt_lines: Sequence[str], src_tok, tgt_tok) -> Encoded:
    src = [ids + [src_tok.eos_id] for ids in src_tok.encode_batch(src_lines)]
    tgt = [[tgt_tok.bos_id] + ids + [tgt_tok.eos_id] for ids in tgt_tok.encode_batch(tgt_lines)]
    return Encoded(src, tgt)


def make_batch(data: Encoded, idx: Sequence[int], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    src, src_len = pad_batch([data.src[i] for i in idx])
    tgt, _ = pad_batch([data.tgt[i] for i in idx])
    return {"src": src.to(device), "src_lengths": src_len.to(device), "tgt": tgt.to(device)}
