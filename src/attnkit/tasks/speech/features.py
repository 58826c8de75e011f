"""Log-mel filterbank features in plain torch (no torchaudio, no download).

For samples ``x`` at ``sample_rate`` Hz: a 25 ms Hann window every 10 ms (centred in an FFT of the
next power of two, whose length the frames span: ``1 + (N - n_fft) // hop`` frames), the power spectrum ``|STFT|²`` summed by ``n_mels`` triangular filters evenly spaced
on the mel scale ``m = 2595 log10(1 + f / 700)`` between 0 Hz and ``min(8000, sample_rate / 2)``,
then ``log(· + 1e-6)`` and each filter's mean over the utterance removed (cepstral mean
normalization, so the level of the recording does not matter). The frame rate is 100 per second
at every sample rate, so real audio needs no resampling.

Example::

    >>> import math, torch
    >>> t = torch.arange(16000) / 16000
    >>> feats = log_mel(torch.sin(2 * math.pi * 440 * t), 16000)
    >>> feats.shape
    torch.Size([97, 40])
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

N_MELS = 40
FRAME_MS, HOP_MS = 25.0, 10.0
F_MAX = 8000.0


def hz_to_mel(f: Tensor | float) -> Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, sample_rate: int, n_mels: int = N_MELS, f_max: float | None = None) -> Tensor:
    """``(n_mels, n_fft // 2 + 1)`` triangular filters: filter ``i`` rises from mel point ``i`` to
    ``i + 1`` and falls to ``i + 2`` (``n_mels + 2`` points evenly spaced in mel)."""
    f_max = min(F_MAX, sample_rate / 2) if f_max is None else f_max
    points = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(f_max)), n_mels + 2, dtype=torch.float64))
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = points[:-2, None], points[1:-1, None], points[2:, None]
    up = (freqs - lo) / (mid - lo)
    down = (hi - freqs) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


def frame_sizes(sample_rate: int) -> tuple[int, int, int]:
    """``(win_length, hop_length, n_fft)`` in samples for ``sample_rate``."""
    if sample_rate < 1000:
        raise ValueError(f"sample_rate must be at least 1000 Hz; got {sample_rate}")
    win = int(round(sample_rate * FRAME_MS / 1000))
    hop = int(round(sample_rate * HOP_MS / 1000))
    return win, hop, 1 << math.ceil(math.log2(win))


def log_mel(samples: Tensor, sample_rate: int, n_mels: int = N_MELS) -> Tensor:
    """``(T, n_mels)`` features of mono ``samples (N,)`` (see the module's docstring)."""
    x = torch.as_tensor(samples, dtype=torch.float32)
    if x.dim() != 1:
        raise ValueError(f"samples must be mono (N,); got shape {tuple(x.shape)}")
    win, hop, n_fft = frame_sizes(int(sample_rate))
    if x.numel() < n_fft:
        x = torch.nn.functional.pad(x, (0, n_fft - x.numel()))
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop, win_length=win, window=torch.hann_window(win),
                      center=False, return_complex=True)
    power = spec.real ** 2 + spec.imag ** 2  # (n_fft // 2 + 1, T)
    mel = mel_filterbank(n_fft, int(sample_rate), n_mels) @ power
    feats = torch.log(mel + 1e-6).T.contiguous()
    return feats - feats.mean(dim=0, keepdim=True)
