"""The image tasks' data: scikit-learn's 8×8 digits split with stratification
(:func:`load_digits_splits`), MNIST's idx files read and checked (:func:`read_idx`,
:func:`read_mnist`, :func:`load_mnist_splits`), batches (:func:`digits_batches`,
:func:`mnist_batches`), the training augmentation (:func:`random_shift`) and one image picked
for ``attnkit viz`` (:func:`pick_image`).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..vocab import batch_indices

if TYPE_CHECKING:  # a type only: the data modules do not import the training code
    from ..classification import Batch

Tensor = torch.Tensor


def image_batches(images: Tensor, labels: Tensor, batch_size: int, seed: int, epoch: int | None) -> list[Batch]:
    """``(images, labels)`` batches: shuffled by ``seed`` and ``epoch``, in order when ``epoch`` is None."""
    idx = batch_indices(len(labels), batch_size, shuffle=epoch is not None, seed=seed * 100_003 + (epoch or 0))
    return [(images[b], labels[b]) for b in idx]


def random_shift(x: Tensor, max_shift: int = 1) -> Tensor:
    """Translate each image ``(B, C, H, W)`` by a random integer offset in
    ``[-max_shift, max_shift]`` along each axis, filling with the background value (the image
    minimum). Uses torch's global RNG (so ``--seed``/``--resume`` reproduce it).

    Example::

        >>> x = torch.zeros(1, 1, 4, 4); x[0, 0, 1, 1] = 1
        >>> int(random_shift(x).sum())
        1
    """
    B, C, H, W = x.shape
    s = max_shift
    padded = torch.nn.functional.pad(x, (s, s, s, s), value=float(x.min()))
    dy = torch.randint(0, 2 * s + 1, (B,))
    dx = torch.randint(0, 2 * s + 1, (B,))
    rows = (dy.view(B, 1) + torch.arange(H)).view(B, 1, H, 1).expand(B, C, H, W + 2 * s)
    out = padded.gather(2, rows)
    cols = (dx.view(B, 1) + torch.arange(W)).view(B, 1, 1, W).expand(B, C, H, W)
    return out.gather(3, cols)


def pick_image(split_name: str, splits: dict[str, tuple[Tensor, Tensor]], index: int) -> tuple[Tensor, int]:
    """``(image, label)`` number ``index`` of split ``split_name`` (``attnkit viz --split --index``)."""
    if split_name not in splits:
        raise ValueError(f"--split must be one of {', '.join(sorted(splits))}; got {split_name!r}")
    x, y = splits[split_name]
    if not 0 <= index < len(y):
        raise ValueError(f"--index {index}: the {split_name} split has images 0 to {len(y) - 1}")
    return x[index], int(y[index])


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn, embedded)
# ---------------------------------------------------------------------------------------------

def load_digits_splits(split_seed: int = 0, test_fraction: float = 0.2, valid_fraction: float = 0.1
                       ) -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's 8×8 digits as ``{"train"|"valid"|"test": (images (N, 1, 8, 8) in [0, 1], labels (N,))}``,
    split with stratification by ``split_seed``: 20% test (360), 10% valid (180), the rest train (1,257).

    Example::

        >>> s = load_digits_splits()
        >>> {k: len(v[1]) for k, v in s.items()}
        {'train': 1257, 'valid': 180, 'test': 360}
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8), pixels 0..16
    y = torch.tensor(d.target, dtype=torch.long)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=d.target, random_state=split_seed)
    train, valid = train_test_split(rest, test_size=valid_fraction / (1 - test_fraction),
                                    stratify=d.target[rest], random_state=split_seed)
    return {name: (x[torch.as_tensor(i)], y[torch.as_tensor(i)])
            for name, i in (("train", train), ("valid", valid), ("test", test))}


def digits_batches(splits: dict[str, tuple[Tensor, Tensor]], batch_size: int, seed: int
                   ) -> Callable[[str, int | None], list[Batch]]:
    """``batches(split, epoch)`` over digits ``splits`` for :func:`~attnkit.tasks.classification.train_classifier`:
    shuffled by ``seed`` and the epoch, in order when ``epoch`` is None."""
    def batches(split: str, epoch: int | None) -> list[Batch]:
        x, y = splits[split]
        return image_batches(x, y, batch_size, seed, epoch)
    return batches


# ---------------------------------------------------------------------------------------------
# MNIST (idx files)
# ---------------------------------------------------------------------------------------------

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path, *, expect_ndim: int | None = None) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), gzipped or not, into a numpy array.

    The header is big-endian: two zero bytes, a type code (``0x08`` = uint8, ``0x09`` int8,
    ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dims
    ``n``, then ``n`` uint32 sizes; the data follow, and the file must hold exactly
    ``prod(sizes)`` items. MNIST images have magic ``2051`` (``0x00000803``: uint8, 3 dims) and
    labels ``2049`` (``0x00000801``: uint8, 1 dim).

    Raises ``ValueError`` naming the file for a missing file, a bad magic number, a wrong number
    of dims (``expect_ndim``), a truncated file, trailing bytes or a corrupt gzip stream.

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
        >>> _ = open(p, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1]))
        >>> read_idx(p).tolist()
        [7, 2, 1]
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"idx file {str(p)!r} does not exist")
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"idx file {str(p)!r} is not a valid gzip file (truncated or corrupt): {e}") from None
    if len(raw) < 4:
        raise ValueError(f"idx file {str(p)!r} is too short ({len(raw)} bytes) to hold an idx header")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    magic = struct.unpack(">I", raw[:4])[0]
    if zero != 0 or code not in IDX_DTYPES or ndim == 0:
        raise ValueError(f"idx file {str(p)!r} has magic number {magic} (0x{magic:08x}), which is not an idx "
                         "header (expected 0x0000TTNN: type code TT in 08/09/0B/0C/0D/0E, NN >= 1 dims; "
                         "MNIST images are 2051, labels 2049)")
    if expect_ndim is not None and ndim != expect_ndim:
        raise ValueError(f"idx file {str(p)!r} has magic number {magic} ({ndim} dims); expected "
                         f"{0x800 + expect_ndim} ({expect_ndim} dims)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx file {str(p)!r} is truncated: {len(raw)} bytes, the header alone needs {header}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have < want:
        raise ValueError(f"idx file {str(p)!r} is truncated: its header says shape {shape} "
                         f"({want} data bytes) but it holds {have}")
    if have > want:
        raise ValueError(f"idx file {str(p)!r} has {have - want} bytes after the {want} data bytes that its header "
                         f"(shape {shape}) announces")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEFAULT_MNIST = "../shared/data/mnist"


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"--data {str(directory)!r}: no {stem} or {stem}.gz in it (MNIST needs "
                     f"{', '.join(s for pair in MNIST_FILES.values() for s in pair)}, gzipped or not)")


def read_mnist(directory: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, H, W) uint8, labels (N,) int64)`` of MNIST's ``part`` (``"train"``: 60,000,
    ``"test"``: 10,000) from the idx files in ``directory``; checks that they agree."""
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"--data: MNIST folder {str(d)!r} does not exist (it should hold the four idx files "
                         "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                         "t10k-labels-idx1-ubyte.gz)")
    img_path, lab_path = (_find(d, s) for s in MNIST_FILES[part])
    images, labels = read_idx(img_path, expect_ndim=3), read_idx(lab_path, expect_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(f"MNIST idx files must hold uint8 data; got {images.dtype} in {str(img_path)!r} and "
                         f"{labels.dtype} in {str(lab_path)!r}")
    if len(images) != len(labels):
        raise ValueError(f"{str(img_path)!r} holds {len(images)} images but {str(lab_path)!r} holds "
                         f"{len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise ValueError(f"{str(lab_path)!r} holds label {int(labels.max())}; MNIST labels are 0-9")
    return images, labels.astype(np.int64)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist_splits(directory: str | Path, valid_size: int = 5000) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"train", "valid", "test"}`` -> ``(images (N, 28, 28) uint8, labels (N,))``: the last
    ``valid_size`` training images are the validation split."""
    tr_x, tr_y = read_mnist(directory, "train")
    te_x, te_y = read_mnist(directory, "test")
    if tr_x.shape[1:] != te_x.shape[1:]:
        raise ValueError(f"MNIST train images are {tr_x.shape[1:]} but test images are {te_x.shape[1:]}")
    if not 0 < valid_size < len(tr_y):
        raise ValueError(f"valid_size must be in (0, {len(tr_y)}); got {valid_size}")
    n = len(tr_y) - valid_size
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return {"train": (t(tr_x[:n]), t(tr_y[:n])), "valid": (t(tr_x[n:]), t(tr_y[n:])), "test": (t(te_x), t(te_y))}


def normalize(x: Tensor) -> Tensor:
    """uint8 pixels (N, H, W) -> float (N, 1, H, W), standardized with MNIST's mean and std."""
    return ((x.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def mnist_batches(splits: dict[str, tuple[Tensor, Tensor]], batch_size: int, seed: int
                  ) -> Callable[[str, int | None], list[Batch]]:
    """As :func:`digits_batches`, for MNIST's uint8 images: each batch standardized by :func:`normalize`."""
    def batches(split: str, epoch: int | None) -> list[Batch]:
        x, y = splits[split]
        return [(normalize(xb), yb) for xb, yb in image_batches(x, y, batch_size, seed, epoch)]
    return batches
