"""Log-mel spectrogram front end, computed on the model's device inside ``forward``.

Dataloader workers only crop and resample waveforms (align/data/audio_io.py); the spectrogram is
a batched ``torch.stft`` here, so it runs on the GPU with the rest of the tower. Legend::

    B batch, T samples, F frames (1 + T // hop_length), K frequency bins (n_fft // 2 + 1), M mel bands

The STFT and the mel projection always run in float32, also under autocast: half-precision
FFTs are unsupported on CPU and lose most of the dynamic range of a power spectrum on GPU.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn


def hertz_to_mel(frequency: np.ndarray, mel_scale: str = "htk") -> np.ndarray:
    """Hz -> mel. ``htk``: 2595 log10(1 + f / 700). ``slaney``: linear below 1 kHz, log above."""
    frequency = np.asarray(frequency, dtype=np.float64)
    if mel_scale == "htk":
        return 2595.0 * np.log10(1.0 + frequency / 700.0)
    if mel_scale == "slaney":
        # Slaney's Auditory Toolbox: 3 mels per 200 Hz up to 1 kHz, then 27 mels per factor 6.4.
        log_step = math.log(6.4) / 27.0
        linear = 3.0 * frequency / 200.0
        return np.where(frequency >= 1000.0, 15.0 + np.log(np.maximum(frequency, 1e-10) / 1000.0) / log_step, linear)
    raise ValueError(f"unknown mel_scale {mel_scale!r}; choose htk or slaney")


def mel_to_hertz(mels: np.ndarray, mel_scale: str = "htk") -> np.ndarray:
    """Inverse of ``hertz_to_mel``."""
    mels = np.asarray(mels, dtype=np.float64)
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    if mel_scale == "slaney":
        log_step = math.log(6.4) / 27.0
        return np.where(mels >= 15.0, 1000.0 * np.exp(log_step * (mels - 15.0)), 200.0 * mels / 3.0)
    raise ValueError(f"unknown mel_scale {mel_scale!r}; choose htk or slaney")


def mel_filter_bank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                    f_max: Optional[float] = None, mel_scale: str = "htk",
                    norm: Optional[str] = None) -> torch.Tensor:
    """Triangular filters, (K, M): ``power_spectrum (..., K) @ bank -> mel (..., M)``.

    Band edges are ``n_mels + 2`` points evenly spaced on the mel scale between ``f_min`` and
    ``f_max``; each triangle is drawn over the linear-frequency FFT bins (as librosa and
    torchaudio do). ``norm="slaney"`` divides each triangle by its width in Hz (constant area).
    """
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
        raise ValueError(f"need 0 <= f_min ({f_min}) < f_max ({f_max}) <= sample_rate / 2 ({sample_rate / 2})")
    if norm not in (None, "slaney"):
        raise ValueError(f"unknown mel norm {norm!r}; choose None or 'slaney'")
    edges_mel = np.linspace(hertz_to_mel(f_min, mel_scale), hertz_to_mel(f_max, mel_scale), n_mels + 2)
    edges_hz = mel_to_hertz(edges_mel, mel_scale)  # (M + 2,)
    bin_hz = np.linspace(0.0, sample_rate / 2.0, n_freqs)  # (K,)
    lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]  # (M,) each
    rising = (bin_hz[:, None] - lower) / (centre - lower)  # (K, M)
    falling = (upper - bin_hz[:, None]) / (upper - centre)  # (K, M)
    bank = np.maximum(0.0, np.minimum(rising, falling))
    if norm == "slaney":
        bank = bank * (2.0 / (upper - lower))
    if (bank.max(axis=0) == 0.0).any():
        warnings.warn(f"{int((bank.max(axis=0) == 0).sum())} of {n_mels} mel filters are empty: "
                      f"n_mels={n_mels} is too many for n_fft={2 * (n_freqs - 1)}; lower n_mels or raise n_fft")
    return torch.from_numpy(bank).float()


class LogMel(nn.Module):
    """Waveform (B, T) -> natural-log mel power spectrogram (B, F, M), F = 1 + T // hop_length.

    Centred frames (reflect padding by ``n_fft // 2``), periodic Hann window of ``win_length``
    (zero-padded to ``n_fft``), power spectrum ``|STFT|^2``, triangular mel filters, then
    ``log(max(mel, floor))``. This matches ``transformers.audio_utils.spectrogram(..., power=2.0,
    mel_filters=mel_filter_bank(...), log_mel="log")`` (tested in tests/test_audio.py).

    Window and filter bank are non-persistent buffers: they follow ``.to(device)`` but are
    rebuilt from the config rather than stored in checkpoints.
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, win_length: Optional[int] = None,
                 hop_length: int = 160, n_mels: int = 64, f_min: float = 0.0, f_max: Optional[float] = None,
                 mel_scale: str = "htk", norm: Optional[str] = None, floor: float = 1e-6) -> None:
        super().__init__()
        win_length = n_fft if win_length is None else win_length
        if not 0 < win_length <= n_fft:
            raise ValueError(f"win_length ({win_length}) must be in 1..n_fft ({n_fft})")
        if hop_length <= 0:
            raise ValueError(f"hop_length must be positive, got {hop_length}")
        self.sample_rate, self.n_fft, self.win_length, self.hop_length = sample_rate, n_fft, win_length, hop_length
        self.n_mels, self.floor = n_mels, floor
        self.register_buffer("window", torch.hann_window(win_length, periodic=True), persistent=False)
        bank = mel_filter_bank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max, mel_scale, norm)
        self.register_buffer("mel_bank", bank, persistent=False)  # (K, M)

    def n_frames(self, n_samples: int) -> int:
        """Frames produced for a waveform of ``n_samples`` (centred STFT)."""
        return 1 + n_samples // self.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 2:
            raise ValueError(f"LogMel expects a (batch, samples) waveform, got shape {tuple(wave.shape)}")
        with torch.autocast(device_type=wave.device.type, enabled=False):
            spectrum = torch.stft(wave.float(), n_fft=self.n_fft, hop_length=self.hop_length,
                                  win_length=self.win_length, window=self.window, center=True,
                                  pad_mode="reflect", return_complex=True)  # (B, K, F)
            power = spectrum.real.square() + spectrum.imag.square()  # (B, K, F)
            mel = torch.einsum("bkf,km->bfm", power, self.mel_bank)  # (B, F, M)
            return torch.log(mel.clamp_min(self.floor))


def normalize_log_mel(spec: torch.Tensor, mode: str, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Scale a log-mel batch (B, F, M).

    ``utterance``: each clip to zero mean, unit variance over all its frames and bands (removes
    recording gain). ``fixed``: ``(spec - mean) / std`` with dataset statistics (AST uses
    mean -4.27, std 2 x 4.57 on its Kaldi features). ``none``: unchanged.
    """
    if mode == "none":
        return spec
    if mode == "fixed":
        return (spec - mean) / std
    if mode == "utterance":
        centred = spec - spec.mean(dim=(1, 2), keepdim=True)
        return centred / centred.square().mean(dim=(1, 2), keepdim=True).add(1e-5).sqrt()
    raise ValueError(f"unknown log-mel normalisation {mode!r}; choose utterance, fixed or none")
