"""Audio towers: our small spectrogram transformer, and transformers audio encoders by config.

Both take a batch of fixed-length waveforms (B, T) made by ``AudioPreprocessor`` in the
dataloader workers and compute the log-mel spectrogram themselves, on the model's device
(align/towers/log_mel.py). Legend for the shapes below::

    B batch, T samples, F frames, M mel bands, N patches/tokens, P frames per patch, W width
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import List, Literal, Optional, Set

import torch
from einops import rearrange
from torch import nn

from align.data.audio_io import AudioPreprocessor
from align.towers.base import Projection, Tower, projection_head
from align.towers.log_mel import LogMel, normalize_log_mel
from align.towers.text import HFTrunkTower, load_hf_trunk, resolve_path, save_hf_sources

# ------------------------------------------------------------------ ours


@dataclass
class AudioTransformerConfig:
    sample_rate: int = 16000
    clip_seconds: float = 1.0  # every clip is cropped/padded to this in the workers
    n_mels: int = 64
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    f_min: float = 0.0
    f_max: Optional[float] = None  # None = sample_rate / 2
    mel_scale: Literal["htk", "slaney"] = "htk"
    normalize: Literal["utterance", "fixed", "none"] = "utterance"  # see log_mel.normalize_log_mel
    norm_mean: float = 0.0  # with normalize: fixed
    norm_std: float = 1.0
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_frames: int = 4  # each token is P consecutive frames x all mel bands
    dropout: float = 0.0
    pooling: Literal["mean", "cls"] = "mean"
    projection: Projection = "auto"  # see towers/base.py projection_head
    crop: Literal["random", "center", "start"] = "random"  # training crop; eval always centres
    pad: Literal["zero", "repeat"] = "zero"
    seed: Optional[int] = None  # reproducible random crops


class AudioTransformerTower(Tower):
    """Log-mel -> time patches -> pre-norm transformer encoder -> mean or CLS pooling.

    A patch is ``patch_frames`` consecutive frames over all mel bands (as in the time-only
    patching of SSAST, https://arxiv.org/abs/2110.09784), so tokens are ordered in time and a
    learned 1-D positional embedding suffices. Trailing frames that do not fill a patch are
    dropped (at most ``patch_frames - 1`` hops).
    """

    modality = "audio"
    Config = AudioTransformerConfig

    def __init__(self, config: AudioTransformerConfig, embed_dim: int) -> None:
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"audio_transformer width ({config.width}) must be divisible by heads ({config.heads})")
        self.config = config
        self.log_mel = LogMel(config.sample_rate, config.n_fft, config.win_length, config.hop_length,
                              config.n_mels, config.f_min, config.f_max, config.mel_scale)
        clip_samples = int(round(config.clip_seconds * config.sample_rate))
        self.max_patches = self.log_mel.n_frames(clip_samples) // config.patch_frames
        if self.max_patches < 1:
            raise ValueError(f"clip_seconds={config.clip_seconds} gives fewer frames than "
                             f"patch_frames={config.patch_frames}")
        self.patch_embed = nn.Linear(config.patch_frames * config.n_mels, config.width)
        extra = 1 if config.pooling == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width)) if extra else None
        self.position = nn.Parameter(torch.zeros(1, self.max_patches + extra, config.width))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(config.width, config.heads, int(config.width * config.mlp_ratio),
                                       config.dropout, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.projection = projection_head(config.width, embed_dim, config.projection)

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        c = self.config
        spec = self.log_mel(wave)  # (B, F, M) float32
        spec = normalize_log_mel(spec, c.normalize, c.norm_mean, c.norm_std)
        n = spec.shape[1] // c.patch_frames
        if not 1 <= n <= self.max_patches:
            raise ValueError(f"audio of {wave.shape[-1]} samples gives {n} patches; this tower takes 1.."
                             f"{self.max_patches} (clip_seconds={c.clip_seconds} at {c.sample_rate} Hz)")
        tokens = rearrange(spec[:, : n * c.patch_frames], "b (n p) m -> b n (p m)", p=c.patch_frames)
        x = self.patch_embed(tokens.to(self.patch_embed.weight.dtype))  # (B, N, W)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, W)
        x = self.dropout(x + self.position[:, : x.shape[1]])
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, W)

    def preprocessor(self, train: bool) -> AudioPreprocessor:
        c = self.config
        return AudioPreprocessor(c.sample_rate, c.clip_seconds, c.crop if train else "center", c.pad, c.seed)

    def trunk_blocks(self) -> List[nn.Module]:
        return list(self.blocks)

    def no_weight_decay(self) -> Set[str]:
        """The positional and class embeddings, raw parameters: not decayed (align/train/optim.py)."""
        return {"position", "cls_token"}

    def trunk_tail(self) -> List[nn.Module]:
        return [self.norm]


# ------------------------------------------------------------------ transformers


@dataclass
class HFAudioConfig:
    path: str = ""  # model folder (safetensors weights), a config.json (random init) or pkg://package/dir
    sample_rate: int = 16000
    clip_seconds: Optional[float] = None  # None: AST's max_length frames, 10 s for waveform models
    # Log-mel settings, used for spectrogram models (AST). Defaults approximate AST's Kaldi
    # fbank (25 ms Hann window in a 512-point FFT, 10 ms hop, 20 Hz to Nyquist, 128 bands).
    n_mels: int = 128
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    f_min: float = 20.0
    f_max: Optional[float] = None
    mel_scale: Literal["htk", "slaney"] = "htk"
    normalize: Literal["utterance", "fixed", "none"] = "fixed"
    norm_mean: float = -4.2677393  # AST AudioSet statistics; AST divides by 2 x std
    norm_std: float = 9.1379948
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    projection: Projection = "auto"
    crop: Literal["random", "center", "start"] = "random"
    pad: Literal["zero", "repeat"] = "zero"
    seed: Optional[int] = None
    local_files_only: bool = True  # never reach a hub unless asked


class HFAudioTower(HFTrunkTower):
    """A transformers audio encoder (AST, wav2vec2, HuBERT, WavLM ...) pooled + projected.

    Spectrogram models (a config with ``num_mel_bins`` and ``max_length``, i.e. AST) get our
    torch log-mel as ``input_values`` (B, max_length, num_mel_bins), zero-padded or cropped in
    frames before normalisation, as ASTFeatureExtractor does. Waveform models (wav2vec2 family:
    ``input_values`` without mel bins) get the waveform normalised to zero mean, unit variance
    per clip. Note that AST checkpoints were trained on torchaudio's Kaldi fbank (Povey window,
    pre-emphasis, DC removal); our log-mel is close to it but not equal, so expect to fine-tune.

    The trunk loads as the text tower's does (``load_hf_trunk``): safetensors weights only, a
    ``config.json`` for random init; a checkpoint saves that config.json (``save_sources``).
    """

    modality = "audio"
    Config = HFAudioConfig

    def __init__(self, config: HFAudioConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.trunk = load_hf_trunk(config.path, config.local_files_only)
        trunk_config = self.trunk.config
        name = f"hf_audio {config.path!r} ({type(self.trunk).__name__})"
        if getattr(self.trunk, "main_input_name", None) != "input_values":
            raise ValueError(f"{name} takes {self.trunk.main_input_name!r}; hf_audio supports encoders taking "
                             "input_values (AST, wav2vec2, HuBERT, WavLM, data2vec-audio)")
        self.spectrogram = hasattr(trunk_config, "num_mel_bins") and hasattr(trunk_config, "max_length")
        self.log_mel: Optional[LogMel] = None
        if self.spectrogram:
            if trunk_config.num_mel_bins != config.n_mels:
                raise ValueError(f"{name} expects num_mel_bins={trunk_config.num_mel_bins} but n_mels={config.n_mels}; "
                                 f"set n_mels: {trunk_config.num_mel_bins}")
            self.max_frames = int(trunk_config.max_length)
            self.log_mel = LogMel(config.sample_rate, config.n_fft, config.win_length, config.hop_length,
                                  config.n_mels, config.f_min, config.f_max, config.mel_scale)
        if config.pooling == "pooler" and not self.spectrogram:
            raise ValueError(f"{name} has no pooler output; use pooling mean or cls")
        self.clip_seconds = config.clip_seconds or (
            self.max_frames * config.hop_length / config.sample_rate if self.spectrogram else 10.0)
        self.projection = projection_head(trunk_config.hidden_size, embed_dim, config.projection)

    def _model_inputs(self, wave: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not self.spectrogram:
            centred = wave - wave.mean(dim=-1, keepdim=True)  # (B, T)
            return centred / centred.square().mean(dim=-1, keepdim=True).add(1e-7).sqrt()
        spec = self.log_mel(wave)[:, : self.max_frames]  # (B, F <= max_length, M)
        spec = nn.functional.pad(spec, (0, 0, 0, self.max_frames - spec.shape[1]))  # (B, max_length, M)
        return normalize_log_mel(spec, c.normalize, c.norm_mean, c.norm_std)

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        inputs = self._model_inputs(wave)
        dtype = next(self.trunk.parameters()).dtype
        output = self.trunk(input_values=inputs.to(dtype))
        if self.config.pooling == "pooler":
            return output.pooler_output  # AST: mean of its CLS and distillation tokens
        hidden = output.last_hidden_state  # (B, N, H)
        return hidden[:, 0] if self.config.pooling == "cls" else hidden.mean(dim=1)

    def save_sources(self, folder: str) -> HFAudioConfig:
        # The trunk's config.json is all that rebuilds it (our log-mel replaces its feature
        # extractor); a preprocessor_config.json beside the source is kept for reference.
        source = resolve_path(self.config.path)
        source_folder = source if os.path.isdir(source) else os.path.dirname(source)
        extractor = os.path.join(source_folder, "preprocessor_config.json")
        saved = save_hf_sources(self.trunk, self.config, folder, self.modality)
        if os.path.isfile(extractor):
            shutil.copyfile(extractor, os.path.join(folder, self.modality, "preprocessor_config.json"))
        return saved

    def preprocessor(self, train: bool) -> AudioPreprocessor:
        c = self.config
        return AudioPreprocessor(c.sample_rate, self.clip_seconds, c.crop if train else "center", c.pad, c.seed)

    def no_weight_decay(self) -> Set[str]:
        """Raw parameters of the trunk's embeddings module (AST: the class and distillation
        tokens and the position table): not decayed (align/train/optim.py)."""
        embeddings = getattr(self.trunk, "embeddings", None)
        if not isinstance(embeddings, nn.Module):
            return set()
        return {f"trunk.embeddings.{name}" for name, _ in embeddings.named_parameters(recurse=False)}

    def trunk_blocks(self) -> List[nn.Module]:
        encoder = getattr(self.trunk, "encoder", None)
        for owner, attribute in ((self.trunk, "layers"), (encoder, "layer"), (encoder, "layers")):
            layers = getattr(owner, attribute, None) if owner is not None else None
            if isinstance(layers, nn.ModuleList):
                return list(layers)
        raise ValueError(f"cannot find the layers of {type(self.trunk).__name__} to unfreeze")

    def trunk_tail(self) -> List[nn.Module]:
        # AST: final layernorm; stable-layer-norm wav2vec2: encoder.layer_norm after the layers.
        encoder = getattr(self.trunk, "encoder", None)
        candidates = [getattr(self.trunk, "layernorm", None), getattr(self.trunk, "pooler", None)]
        if encoder is not None and getattr(self.trunk.config, "do_stable_layer_norm", False):
            candidates.append(getattr(encoder, "layer_norm", None))
        return [m for m in candidates if isinstance(m, nn.Module)]
