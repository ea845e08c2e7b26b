"""Audio input and audio towers, checked against independent references.

References: scipy.signal.resample_poly and an analytic sine (resampling), transformers' numpy
``spectrogram`` + ``mel_filter_bank`` (log-mel), soundfile-written files (decoding),
``ASTModel`` run directly (hf_audio).
"""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import soundfile
import torch

from align.data.audio_io import AudioPreprocessor, load_audio, resample
from align.registry import TOWERS
from align.towers.audio import AudioTransformerTower, HFAudioTower
from align.towers.base import freeze_tower
from align.towers.log_mel import LogMel

EMBED_DIM = 24


def sine_mix(sample_rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 3000 * t + 0.3)


# ------------------------------------------------------------------ load_audio


def test_load_audio_reads_flac_file_and_downmixes(tmp_path):
    rng = np.random.default_rng(0)
    left = (0.5 * rng.uniform(-1, 1, 8000)).astype(np.float32)
    right = (0.2 * rng.uniform(-1, 1, 8000)).astype(np.float32)
    path = tmp_path / "clip.flac"
    soundfile.write(path, np.stack([left, right], axis=1), 22050, subtype="PCM_24")
    wave, sample_rate = load_audio(str(path))
    assert sample_rate == 22050 and wave.dtype == np.float32 and wave.shape == (8000,)
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-6)  # 24-bit quantisation
    wave_from_bytes, _ = load_audio(path.read_bytes())
    np.testing.assert_array_equal(wave_from_bytes, wave)


@pytest.mark.parametrize("fmt", ["FLAC", "WAV"])
def test_load_audio_truncated_bytes_raise_value_error(fmt):
    buffer = io.BytesIO()
    soundfile.write(buffer, sine_mix(16000).astype(np.float32) * 0.3, 16000, format=fmt)
    data = buffer.getvalue()
    with pytest.raises(ValueError, match="<bytes>"):
        load_audio(data[: len(data) // 2])
    with pytest.raises(ValueError, match="<bytes>"):
        load_audio(b"not audio at all" * 10)


def test_load_audio_names_the_bad_file(tmp_path):
    path = tmp_path / "broken.wav"
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(4000, np.float32), 16000, format="WAV")
    path.write_bytes(buffer.getvalue()[:-500])
    with pytest.raises(ValueError, match="broken.wav"):
        load_audio(str(path))
    with pytest.raises(FileNotFoundError, match="missing.flac"):
        load_audio(str(tmp_path / "missing.flac"))


# ------------------------------------------------------------------ resample


@pytest.mark.parametrize("orig, new", [(44100, 16000), (8000, 16000), (48000, 16000), (22050, 16000)])
def test_resample_matches_scipy_and_the_analytic_sine(orig, new):
    from scipy.signal import resample_poly

    wave = sine_mix(orig).astype(np.float32)
    out = resample(torch.from_numpy(wave), orig, new).numpy()
    reference = resample_poly(wave.astype(np.float64), new, orig)
    assert out.shape == reference.shape == (int(np.ceil(len(wave) * new / orig)),)
    t = np.arange(len(out)) / new
    exact = np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 3000 * t + 0.3)
    inner = slice(100, -100)  # both filters see zero padding at the edges
    # the bounds are the two filter designs' difference (windowed sinc against scipy's Kaiser
    # FIR), not rounding: float32 adds ~1e-6 (a 32-tap sum of values <= 1.5)
    np.testing.assert_allclose(out[inner], reference[inner], atol=3e-3)
    np.testing.assert_allclose(out[inner], exact[inner], atol=2e-3)


def test_resample_is_batched_and_removes_aliases():
    from scipy.signal import resample_poly

    rng = np.random.default_rng(1)
    batch = rng.standard_normal((2, 3, 4410)).astype(np.float32)  # white noise: energy above 8 kHz must go
    out = resample(torch.from_numpy(batch), 44100, 16000)
    assert out.shape == (2, 3, 1600)
    reference = resample_poly(batch[1, 2].astype(np.float64), 160, 441)
    spectrum = lambda x: np.abs(np.fft.rfft(x[50:-50]))  # noqa: E731
    ours, theirs = spectrum(out[1, 2].numpy()), spectrum(reference)
    # Compare band energies, not samples: the two low-pass filters differ right at the cut-off.
    band = slice(0, int(0.85 * len(ours)))
    assert abs(np.sum(ours[band] ** 2) / np.sum(theirs[band] ** 2) - 1) < 0.02


# ------------------------------------------------------------------ AudioPreprocessor


def test_preprocessor_crops_and_pads_to_the_clip_length():
    long_wave = np.arange(48000, dtype=np.float32)
    centre = AudioPreprocessor(16000, 1.0, crop="center")((long_wave, 16000))
    assert centre.shape == (16000,) and centre.dtype == torch.float32
    assert centre[0].item() == 16000  # (48000 - 16000) // 2
    start = AudioPreprocessor(16000, 1.0, crop="start")((long_wave, 16000))
    assert start[0].item() == 0
    random_crop = AudioPreprocessor(16000, 1.0, crop="random", seed=0)((long_wave, 16000))
    assert torch.equal(random_crop, torch.arange(random_crop[0].item(), random_crop[0].item() + 16000))

    short = np.ones(1000, np.float32)
    zero = AudioPreprocessor(16000, 0.25, pad="zero")((short, 16000))
    assert zero.shape == (4000,) and zero[:1000].eq(1).all() and zero[1000:].eq(0).all()
    tiled = np.arange(1000, dtype=np.float32)
    repeat = AudioPreprocessor(16000, 0.25, pad="repeat")((tiled, 16000))
    assert torch.equal(repeat, torch.from_numpy(np.tile(tiled, 4)))


def test_preprocessor_resamples_and_reads_bytes(tmp_path):
    wave = (0.3 * sine_mix(8000, 0.5)).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, 8000, format="FLAC")
    out = AudioPreprocessor(16000, 0.5, crop="center")(buffer.getvalue())
    assert out.shape == (8000,)
    t = np.arange(8000) / 16000
    exact = 0.3 * (np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 3000 * t + 0.3))
    np.testing.assert_allclose(out.numpy()[100:-100], exact[100:-100], atol=2e-3)


def test_preprocessor_random_crops_are_seeded_and_picklable():
    wave = (np.random.default_rng(2).standard_normal(40000).astype(np.float32), 16000)
    first = AudioPreprocessor(16000, 0.5, seed=7)
    stream = [first(wave) for _ in range(4)]
    assert torch.equal(stream[0], AudioPreprocessor(16000, 0.5, seed=7)(wave))  # same seed, same first crop
    assert not all(torch.equal(stream[0], other) for other in stream[1:])  # crops vary within a stream
    clone = pickle.loads(pickle.dumps(first))
    assert torch.equal(clone(wave), AudioPreprocessor(16000, 0.5, seed=7)(wave))  # a fresh stream per process


# ------------------------------------------------------------------ LogMel


@pytest.mark.parametrize("n_fft, win_length, mel_scale, norm",
                         [(400, 400, "htk", None), (512, 400, "slaney", "slaney")])
def test_log_mel_matches_transformers_numpy_reference(n_fft, win_length, mel_scale, norm):
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    rng = np.random.default_rng(3)
    waves = (0.1 * rng.standard_normal((2, 8000))).astype(np.float32)
    front = LogMel(16000, n_fft, win_length, 160, n_mels=40, f_min=20.0, f_max=7600.0, mel_scale=mel_scale, norm=norm,
                   floor=1e-10)
    ours = front(torch.from_numpy(waves)).numpy()  # (B, F, M)
    bank = mel_filter_bank(n_fft // 2 + 1, 40, 20.0, 7600.0, 16000, norm=norm, mel_scale=mel_scale)
    for row in range(2):
        reference = spectrogram(waves[row].astype(np.float64), window_function(win_length, "hann"), win_length, 160,
                                fft_length=n_fft, power=2.0, mel_filters=bank, mel_floor=1e-10, log_mel="log",
                                dtype=np.float64).T  # (F, M)
        assert ours[row].shape == reference.shape == (1 + 8000 // 160, 40)
        # log-mel error = relative error of a mel band's power. float32 FFT of a frame is off by
        # ~log2(n_fft) eps of the frame's energy (~5e-7); these white-noise bands each hold
        # >= ~1/200 of it, so |d log| <~ 1e-4, well inside 2e-3.
        np.testing.assert_allclose(ours[row], reference, atol=2e-3, rtol=1e-4)


def test_log_mel_runs_in_float32_under_autocast():
    front = LogMel(16000, 400, 400, 160, 32)
    wave = torch.randn(2, 4000)
    plain = front(wave)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = front(wave.bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, front(wave.bfloat16().float()))  # the same float32 computation
    assert plain.shape == (2, 26, 32)


# ------------------------------------------------------------------ towers


def tiny_ast_config(tmp_path, **overrides):
    from transformers import ASTConfig

    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_length=100, num_mel_bins=64, frequency_stride=16, time_stride=16, patch_size=16)
    settings.update(overrides)
    config = ASTConfig(**settings)
    path = tmp_path / "ast_config.json"
    config.to_json_file(str(path))
    return config, str(path)


def make_tower(name, tmp_path):
    cls = TOWERS.get(name)
    if name == "hf_audio":
        _, path = tiny_ast_config(tmp_path)
        return cls(cls.Config(path=path, n_mels=64, n_fft=400), EMBED_DIM)
    return cls(cls.Config(layers=2, width=32, heads=2, clip_seconds=0.5), EMBED_DIM)


AUDIO_TOWERS = [name for name in TOWERS.names() if getattr(TOWERS.get(name), "modality", "") == "audio"]


def test_both_audio_towers_are_registered():
    assert {"audio_transformer", "hf_audio"} <= set(AUDIO_TOWERS)


@pytest.mark.parametrize("name", AUDIO_TOWERS)
def test_audio_tower_embeds_clips_and_trains(name, tmp_path):
    torch.manual_seed(0)
    tower = make_tower(name, tmp_path)
    prepare = tower.preprocessor(train=True)
    raw = [(np.random.default_rng(i).standard_normal(12000 + 3000 * i).astype(np.float32), 22050) for i in range(3)]
    batch = torch.stack([prepare(value) for value in raw])  # (B, T)
    assert batch.shape == (3, prepare.clip_samples)
    embeddings = tower(batch)
    assert embeddings.shape == (3, EMBED_DIM)
    # float32 norm of a normalised vector of size 24: at most 24 + 3 roundings of 1, < 2e-6
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3), rtol=0, atol=2e-6)
    target = torch.randn(3, EMBED_DIM)  # |e|^2 is constant after L2-normalisation: use a direction instead
    (embeddings * target).sum().backward()
    grads = [p.grad for p in tower.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", AUDIO_TOWERS)
def test_freezing_leaves_last_block_tail_and_projection_trainable(name, tmp_path):
    tower = make_tower(name, tmp_path)
    freeze_tower(tower, True, unfreeze_last=1)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    blocks = tower.trunk_blocks()
    expected = {id(p) for module in [blocks[-1], *tower.trunk_tail(), tower.projection] for p in module.parameters()}
    assert {id(p) for p in tower.parameters() if p.requires_grad} == expected
    assert all(not p.requires_grad for p in blocks[0].parameters())
    assert trainable and len(blocks) == 2
    loss = tower(torch.randn(2, tower.preprocessor(False).clip_samples)).sum()
    loss.backward()
    assert all(p.grad is None for p in blocks[0].parameters())


def test_hf_audio_feeds_our_log_mel_to_ast(tmp_path):
    from transformers import ASTModel

    config, path = tiny_ast_config(tmp_path)
    torch.manual_seed(0)
    tower = HFAudioTower(HFAudioTower.Config(path=path, n_mels=64, normalize="none", pooling="pooler"), EMBED_DIM)
    tower.eval()
    prepare = tower.preprocessor(train=False)
    assert prepare.clip_samples == 100 * 160  # max_length frames of 10 ms
    wave = torch.randn(2, 12000)  # shorter than max_length: zero-padded frames
    frames = LogMel(16000, 512, 400, 160, 64, 20.0)(wave)  # (2, 76, 64), the config's defaults
    padded = torch.cat([frames, torch.zeros(2, 100 - frames.shape[1], 64)], dim=1)
    reference_model = ASTModel(config).eval()
    reference_model.load_state_dict(tower.trunk.state_dict())
    # Both trunks in float64 (the log-mel stays float32 on both sides, the same computation):
    # they agree to float64 rounding on any CPU's kernels.
    tower.trunk.double(), reference_model.double()
    with torch.no_grad():
        expected = reference_model(input_values=padded.double()).pooler_output
        torch.testing.assert_close(tower.features(wave), expected)


def test_hf_audio_reloads_a_saved_checkpoint(tmp_path):
    from transformers import ASTModel

    config, _ = tiny_ast_config(tmp_path, num_hidden_layers=1)
    torch.manual_seed(1)
    original = ASTModel(config)
    original.save_pretrained(tmp_path / "ast")
    tower = HFAudioTower(HFAudioTower.Config(path=str(tmp_path / "ast"), n_mels=64), EMBED_DIM)
    saved = original.state_dict()
    loaded = tower.trunk.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


def test_hf_audio_refuses_mismatched_mel_bins(tmp_path):
    _, path = tiny_ast_config(tmp_path)
    with pytest.raises(ValueError, match="num_mel_bins=64"):
        HFAudioTower(HFAudioTower.Config(path=path, n_mels=128), EMBED_DIM)


def test_hf_audio_takes_waveform_models(tmp_path):
    from transformers import Wav2Vec2Config

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2)
    path = tmp_path / "wav2vec2.json"
    config.to_json_file(str(path))
    tower = HFAudioTower(HFAudioTower.Config(path=str(path), clip_seconds=0.25), EMBED_DIM)
    quiet = torch.randn(2, 4000)
    loud = quiet * 100  # per-clip normalisation: gain does not change the embedding
    tower.eval().double()  # float64: only the 1e-7 in the normaliser's variance tells them apart
    with torch.no_grad():
        torch.testing.assert_close(tower(quiet.double()), tower(loud.double()), atol=1e-4, rtol=1e-4)
    assert len(tower.trunk_blocks()) == 1
