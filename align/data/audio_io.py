"""Audio input for the dataloader workers: decode, resample, crop and pad to a fixed clip.

Decoding uses soundfile (libsndfile: wav, flac, ogg); resampling is a windowed-sinc polyphase
filter in torch (no torchaudio). The log-mel spectrogram is *not* computed here: it runs
batched on the model's device (align/towers/log_mel.py).
"""
from __future__ import annotations

import functools
import io
import math
import os
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


def _describe(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def _wav_shortfall(head: bytes, total_size: int) -> int:
    """Bytes missing from a RIFF/WAVE file whose ``data`` chunk is cut short (0 when complete).

    libsndfile shrinks the frame count of a truncated WAV to what is there and reads it without
    complaint, so the declared chunk size is checked here. ``head``: the file's first bytes.
    """
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return 0
    order = "little" if head[:4] == b"RIFF" else "big"
    offset = 12
    while offset + 8 <= len(head):
        size = int.from_bytes(head[offset + 4:offset + 8], order)
        if head[offset:offset + 4] == b"data":
            if size in (0, 0xFFFFFFFF):  # streamed WAV: size unknown by design
                return 0
            return max(0, size - (total_size - offset - 8))
        offset += 8 + size + (size & 1)  # chunks are padded to even sizes
    return 0


def load_audio(source: Any) -> Tuple[np.ndarray, int]:
    """Decode a file path, encoded bytes (webdataset) or a binary file object.

    Returns ``(wave, sample_rate)``: float32 mono (T,) in [-1, 1], channels averaged.
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming the source for
    anything that does not decode to a non-empty finite waveform (corrupt or truncated files).
    """
    import soundfile

    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"audio file not found: {name}")
        handle: Any = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        handle = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        handle = source
    else:
        raise TypeError(f"load_audio takes a path, bytes or a binary file object, got {type(source).__name__}")
    try:
        with soundfile.SoundFile(handle) as audio:
            expected = audio.frames
            data = audio.read(dtype="float32", always_2d=True)  # (T, C)
            sample_rate = audio.samplerate
    except (RuntimeError, soundfile.SoundFileError, EOFError, AssertionError, TypeError) as error:
        raise ValueError(f"cannot decode audio {name}: {error}") from error
    # libsndfile stops quietly at a truncated body; the header says how much to expect.
    if 0 < expected < (1 << 62) and data.shape[0] < expected:
        raise ValueError(f"audio {name} is truncated: header promises {expected} frames, decoded {data.shape[0]}")
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as file:
            missing = _wav_shortfall(file.read(1 << 16), os.path.getsize(source))
    elif isinstance(handle, io.BytesIO) and not handle.closed:
        missing = _wav_shortfall(handle.getbuffer()[: 1 << 16].tobytes(), handle.getbuffer().nbytes)
    else:
        missing = 0
    if missing:
        raise ValueError(f"audio {name} is truncated: its WAV data chunk lacks {missing} bytes")
    if data.shape[0] == 0:
        raise ValueError(f"audio {name} holds no samples")
    wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wave).all():
        raise ValueError(f"audio {name} decodes to non-finite samples")
    return np.ascontiguousarray(wave, dtype=np.float32), int(sample_rate)


@functools.lru_cache(maxsize=16)
def _sinc_kernels(orig: int, new: int, zero_crossings: int, rolloff: float) -> Tuple[torch.Tensor, int]:
    """Polyphase low-pass kernels (new, 1, 2 * width + orig) for integer rates already divided by their gcd.

    Output sample ``n`` of phase ``p`` sits at input time ``(n * orig + p * orig / new)``; its
    kernel is a Hann-windowed sinc with cut-off ``rolloff * min(orig, new) / 2`` (in units of
    the slower rate), ``zero_crossings`` lobes each side.
    """
    cutoff = min(orig, new) * rolloff  # low-pass cut-off, 2x in Hz per gcd (i.e. a rate in gcd units)
    width = math.ceil(zero_crossings * orig / cutoff)  # kernel half-length in input samples
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig  # (L,) tap times, in gcd periods
    phases = -torch.arange(new, dtype=torch.float64)[:, None] / new  # (new, 1) output phase offsets
    t = (phases + taps[None]) * cutoff  # (new, L) time in zero-crossings of the low-pass sinc
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2  # Hann over +-zero_crossings
    kernels = torch.special.sinc(t) * window * (cutoff / orig)  # (new, L)
    return kernels[:, None].float(), width


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int, zero_crossings: int = 16,
             rolloff: float = 0.945) -> torch.Tensor:
    """Band-limited resampling along the last axis: (..., T) -> (..., ceil(T * new_sr / orig_sr)).

    Windowed-sinc polyphase filter (the method of torchaudio's ``resample`` and of Smith's
    "Digital Audio Resampling", https://ccrma.stanford.edu/~jos/resample/): the rates are
    reduced by their gcd, each of the ``new`` output phases gets its own kernel, and one strided
    ``conv1d`` produces them all. ``rolloff`` places the anti-aliasing cut-off just under the
    lower Nyquist rate. The output length is ``ceil(T * new / orig)``, the number of output
    instants inside the input's duration (as scipy.signal.resample_poly and torchaudio).
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wave
    gcd = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // gcd, int(new_sr) // gcd
    kernels, width = _sinc_kernels(orig, new, zero_crossings, rolloff)
    dtype = wave.dtype if wave.is_floating_point() else torch.float32
    shape, length = wave.shape[:-1], wave.shape[-1]
    flat = wave.reshape(-1, 1, length).to(dtype)  # (N, 1, T)
    flat = F.pad(flat, (width, width + orig))
    out = F.conv1d(flat, kernels.to(device=wave.device, dtype=dtype), stride=orig)  # (N, new, frames)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)  # interleave phases: (N, frames * new)
    target = math.ceil(new * length / orig)
    return out[:, :target].reshape(*shape, target)


def _as_wave(value: Any) -> Tuple[np.ndarray, int]:
    """``(wave, sr)`` / path / bytes -> float32 mono numpy wave and its rate."""
    if isinstance(value, tuple) and len(value) == 2:
        wave, sample_rate = value
        wave = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
        if wave.ndim == 2:  # (T, C) from soundfile or (C, T): channels are the short axis
            wave = wave.mean(axis=1 if wave.shape[1] <= wave.shape[0] else 0)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"audio wave must be a non-empty (T,) array, got shape {wave.shape}")
        return wave.astype(np.float32, copy=False), int(sample_rate)
    if isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(value, "read"):
        return load_audio(value)
    raise TypeError(f"audio value must be (wave, sample_rate), a path or bytes, got {type(value).__name__}")


class AudioPreprocessor:
    """Picklable worker transform: raw audio -> float32 tensor (clip_samples,) at ``sample_rate``.

    Accepts ``(wave, sr)`` (numpy or torch, mono (T,), or (T, C)/(C, T) which is averaged), a
    file path, or encoded bytes. Resamples when ``sr != sample_rate``, then crops clips longer
    than ``clip_seconds`` (``random`` window for training, ``center`` or ``start`` for eval) and
    pads shorter ones (``zero``: silence at the end; ``repeat``: the clip tiled).

    With ``seed`` the random crops are reproducible: each dataloader worker draws from
    ``(seed, worker id)``. Without it each process seeds itself from fresh entropy, so forked
    workers do not repeat each other's crops.
    """

    def __init__(self, sample_rate: int, clip_seconds: float, crop: str = "random", pad: str = "zero",
                 seed: Optional[int] = None) -> None:
        if crop not in ("random", "center", "start"):
            raise ValueError(f"crop must be random, center or start, got {crop!r}")
        if pad not in ("zero", "repeat"):
            raise ValueError(f"pad must be zero or repeat, got {pad!r}")
        if clip_seconds <= 0:
            raise ValueError(f"clip_seconds must be positive, got {clip_seconds}")
        self.sample_rate = int(sample_rate)
        self.clip_samples = int(round(clip_seconds * sample_rate))
        self.crop, self.pad, self.seed = crop, pad, seed
        self._rng: Optional[np.random.Generator] = None
        self._rng_pid: Optional[int] = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rng"] = state["_rng_pid"] = None  # each process (worker) starts its own stream
        return state

    def reseed(self, seed: Union[int, Sequence[int]]) -> None:
        """Draw the next random crops from ``seed`` in this process (the loaders call this per
        sample, so a crop depends on the sample's key, not on the worker that made it)."""
        self._rng = np.random.default_rng(seed)
        self._rng_pid = os.getpid()

    def _generator(self) -> np.random.Generator:
        if self._rng is None or self._rng_pid != os.getpid():
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            self._rng = np.random.default_rng(None if self.seed is None else [self.seed, worker])
            self._rng_pid = os.getpid()
        return self._rng

    def __call__(self, value: Any) -> torch.Tensor:
        wave_np, sample_rate = _as_wave(value)
        wave = torch.from_numpy(np.ascontiguousarray(wave_np))  # (T,)
        if sample_rate != self.sample_rate:
            wave = resample(wave, sample_rate, self.sample_rate)
        length, clip = wave.shape[0], self.clip_samples
        if length > clip:
            if self.crop == "random":
                start = int(self._generator().integers(0, length - clip + 1))
            elif self.crop == "center":
                start = (length - clip) // 2
            else:
                start = 0
            wave = wave[start:start + clip]
        elif length < clip:
            if self.pad == "repeat":
                wave = wave.repeat(math.ceil(clip / length))[:clip]
            else:
                wave = F.pad(wave, (0, clip - length))
        return wave.float().contiguous()
