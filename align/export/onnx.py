"""ONNX export: one graph per tower, ``<out>/onnx/<modality>.onnx``, and ``preprocess.json`` saying
how to make its inputs; run with onnxruntime, no torch and no code of ours.

Every graph has a dynamic batch axis and one output, ``embedding`` float32 (B, D), L2-normalised
rows in the model's shared space (with ``--dim``, D is the Matryoshka prefix and preprocess.json's
``matryoshka`` says so). With ``--quantize int8`` each ``<modality>.onnx`` has an int8 twin
``<modality>.int8.onnx`` with the same inputs and output (align/export/quantize.py; preprocess.json:
``int8`` says how, each tower's ``int8_file`` names it). ``OnnxEncoder`` runs a folder's graphs
behind the model's ``encode`` interface. Inputs::

    text  (open_clip_text)   input_ids       int64 (B, context_length), open_clip's tokenizer padded
                                             with 0 to the context length
    text  (hf_text)          input_ids       int64 (B, L), L <= max_length (dynamic)
                             attention_mask  int64 (B, L), 1 for real tokens
    image (open_clip_image)  pixel_values    float32 (B, 3, H, W), already normalised: (RGB / 255 - mean) / std
    audio (audio_transformer,
           hf_audio)         waveform        float32 (B, T), mono at the tower's sample rate, T = its
                                             clip length; the log-mel front end runs INSIDE the graph
                                             (the STFT as a convolution by the DFT matrix, ``DftLogMel``)

The graphs come from ``torch.onnx.export(..., dynamo=True)`` (``torch.export``), which keeps the
batch axis symbolic; the older TorchScript exporter can bake it in. Two ONNX pitfalls are avoided
on purpose (see FIELD_NOTES.md): the CLIP text tower pools at its end-of-text token with an argmax
over the token ids, and onnxruntime has no int64 ArgMax, so the ids are cast to int32 first (the
vocabulary, 49408, fits); and our towers' data-dependent cut of all-padding columns (``used_length``)
is left out of the graph, which is exact (causal or masked attention never sees those columns).

Nothing is unpickled here: the model comes from align/loading.py, the graph is written by onnx.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from align.errors import RunError, write_json_atomic
from align.export.libraries import missing_library
from align.towers.audio import AudioTransformerTower, HFAudioTower
from align.towers.base import Tower
from align.towers.open_clip import OpenClipImageTower, OpenClipTextTower, _encodes_prefixes
from align.towers.text import HFTextTower

SUBDIR = "onnx"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_SUBDIR = "tokenizer"
OUTPUT = "embedding"
OPSET = 18  # LayerNormalization is a native op from opset 17 on
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GiB: bigger weights go to a .data file beside it
MAX_BATCH = 65536
# module name: pip package. torch.onnx's dynamo exporter needs onnxscript; checking and quantising need onnxruntime
LIBRARIES = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}
INSTALL = "pip install 'align[export]'"
Precision = Literal["float32", "int8"]


# ------------------------------------------------------------------ graph modules


class ImageGraph(nn.Module):
    """pixel_values (B, 3, H, W) float32, normalised -> (B, D): the tower as it runs on float images."""

    def __init__(self, tower: OpenClipImageTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values)


class ClipTextGraph(nn.Module):
    """input_ids (B, L) int64 -> (B, D): open_clip's text forward with the end-of-text argmax on int32."""

    def __init__(self, tower: OpenClipTextTower) -> None:
        super().__init__()
        self.tower = tower
        self.text = tower._text()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        text, length = self.text, input_ids.shape[1]
        x = text.token_embedding(input_ids) + text.positional_embedding[:length]  # (B, L, W)
        x = text.ln_final(text.transformer(x, attn_mask=text.attn_mask[:length, :length]))
        # The end-of-text token has the largest id; onnxruntime's ArgMax takes no int64.
        eot = input_ids.to(torch.int32).argmax(dim=-1)  # (B,)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W)
        projection = text.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)
        elif projection is not None:
            pooled = pooled @ projection  # (B, clip_dim)
        return F.normalize(self.tower.projection(pooled), dim=-1)


class HFTextGraph(nn.Module):
    """(input_ids, attention_mask) (B, L) int64 -> (B, D): trunk, masked mean or CLS pooling, projection."""

    def __init__(self, tower: HFTextTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        hidden = tower.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        if tower.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, H)
        return F.normalize(tower.projection(pooled), dim=-1)


class DftLogMel(nn.Module):
    """``LogMel`` (align/towers/log_mel.py) with the STFT as a strided convolution by the windowed
    DFT matrix: waveform (B, T) -> log-mel (B, F, M), the same maths.

    Measured here on the demo model: onnxruntime 1.32's STFT op (what the exporter makes of
    ``torch.stft``) ran 24x slower than torch at batch 32 and moved the audio embeddings by up to
    1.7e-4, while torch's float32 FFT stays within 9e-7 of a float64 reference. With this twin the
    graph is within 1.4e-6 and faster than torch. The cosines and sines are computed in float64 from
    ``(k n) mod n_fft`` (exact angles) and rounded once to float32.
    """

    def __init__(self, log_mel: nn.Module) -> None:
        super().__init__()
        n_fft, win_length = log_mel.n_fft, log_mel.win_length
        self.n_fft, self.hop_length, self.floor = n_fft, log_mel.hop_length, log_mel.floor
        window = torch.zeros(n_fft, dtype=torch.float64)
        left = (n_fft - win_length) // 2  # torch.stft centres a shorter window inside n_fft
        window[left:left + win_length] = log_mel.window.double()
        bins = torch.arange(n_fft // 2 + 1, dtype=torch.int64)
        samples = torch.arange(n_fft, dtype=torch.int64)
        angle = 2 * torch.pi * ((bins[:, None] * samples[None, :]) % n_fft).double() / n_fft  # (K, n_fft)
        kernel = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])  # (2K, n_fft)
        self.register_buffer("kernel", kernel.float()[:, None, :], persistent=False)  # (2K, 1, n_fft)
        self.register_buffer("mel_bank", log_mel.mel_bank.float(), persistent=False)  # (K, M)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        half = self.n_fft // 2
        padded = F.pad(wave[:, None, :], (half, half), mode="reflect")  # (B, 1, T + n_fft)
        spectrum = F.conv1d(padded, self.kernel, stride=self.hop_length)  # (B, 2K, F): real rows, then imaginary
        real, imag = spectrum.chunk(2, dim=1)  # (B, K, F) each
        power = (real.square() + imag.square()).transpose(1, 2)  # (B, F, K)
        return torch.log((power @ self.mel_bank).clamp_min(self.floor))  # (B, F, M)


class AudioGraph(nn.Module):
    """waveform (B, T) float32 -> (B, D): log-mel front end, trunk, pooling, projection. The tower
    is a copy whose ``LogMel`` is the ``DftLogMel`` twin (waveform models have none)."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        import copy

        self.tower = copy.deepcopy(tower)
        if getattr(tower, "log_mel", None) is not None:
            self.tower.log_mel = DftLogMel(tower.log_mel)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.tower(waveform)


def clip_samples(tower: Tower) -> Tuple[int, int, float]:
    """(sample rate, samples per clip, clip seconds) an audio tower's preprocessor produces."""
    seconds = tower.clip_seconds if isinstance(tower, HFAudioTower) else tower.config.clip_seconds
    rate = int(tower.config.sample_rate)
    return rate, int(round(seconds * rate)), float(seconds)


def graph_for(tower: Tower) -> Tuple[nn.Module, Tuple[torch.Tensor, ...], List[str], Tuple[Dict[int, Any], ...]]:
    """(module, example inputs, input names, dynamic shapes) of the graph for ``tower``; a tower
    type with no graph here is a ``RunError`` (``onnx_problem`` refuses it before any work)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    if isinstance(tower, OpenClipImageTower):
        height, width = _pair(tower.image_size)
        return ImageGraph(tower), (torch.zeros(2, 3, height, width),), ["pixel_values"], ({0: batch},)
    if isinstance(tower, OpenClipTextTower):
        context = tower.trunk.context_length
        ids = torch.zeros(2, context, dtype=torch.long)
        ids[:, 0], ids[:, 1] = 49406, 49407  # <start_of_text> <end_of_text>: any ids trace the same graph
        return ClipTextGraph(tower), (ids,), ["input_ids"], ({0: batch},)
    if isinstance(tower, HFTextTower):
        length = torch.export.Dim("tokens", min=2, max=max(3, tower.config.max_length))
        ids = torch.ones(2, min(8, tower.config.max_length), dtype=torch.long)
        return (HFTextGraph(tower), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"],
                ({0: batch, 1: length}, {0: batch, 1: length}))
    if isinstance(tower, (AudioTransformerTower, HFAudioTower)):
        _, samples, _ = clip_samples(tower)
        return AudioGraph(tower), (torch.zeros(2, samples),), ["waveform"], ({0: batch},)
    raise RunError(f"no ONNX graph for a {type(tower).__name__} tower")


def onnx_problem(modality: str, tower: Tower) -> Optional[str]:
    """Why this tower has no ONNX graph here, or None."""
    missing = missing_library(LIBRARIES, INSTALL)
    if missing:
        return missing
    known = (OpenClipImageTower, OpenClipTextTower, HFTextTower, AudioTransformerTower, HFAudioTower)
    if not isinstance(tower, known):
        return (f"model.towers.{modality} is a {type(tower).__name__}; ONNX export knows "
                f"{', '.join(cls.__name__ for cls in known)}")
    if isinstance(tower, OpenClipTextTower) and not _encodes_prefixes(tower._text()):
        return (f"model.towers.{modality}: this open_clip text model does not pool at its end-of-text token "
                "under causal attention (SigLIP-style pooling or an HF text encoder); no ONNX graph for it here")
    return None


def _pair(size: Any) -> Tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


# ------------------------------------------------------------------ writing


def export_graph(tower: Tower, path: str) -> Dict[str, torch.Tensor]:
    """``tower`` as an ONNX graph at ``path`` (float32, dynamic batch, output ``embedding``); the
    example inputs it was traced with, by name."""
    import onnx

    for chatty in ("onnxscript", "onnx_ir", "torch.onnx"):  # an INFO line per rewrite rule and initialiser
        logging.getLogger(chatty).setLevel(logging.WARNING)
    module, example, names, dynamic = graph_for(tower)
    module = module.eval().float()
    with torch.no_grad():
        try:
            program = torch.onnx.export(module, example, dynamo=True, input_names=names, output_names=["_out"],
                                        dynamic_shapes=dynamic, opset_version=OPSET, optimize=True, verbose=False)
        except Exception as error:  # the exporter raises its own types for an unsupported op
            raise RunError(f"ONNX export of the {tower.modality} tower ({type(tower).__name__}) failed: "
                           f"{type(error).__name__}: {str(error)[:500]}") from None
    proto = program.model_proto
    # open_clip's token table is an nn.Embedding: its lookup's value is named "embedding" in
    # the graph, which would clash with the output name the format promises.
    _rename_value(proto.graph, OUTPUT, f"{OUTPUT}_inner")
    _rename_value(proto.graph, "_out", OUTPUT)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    onnx.save_model(proto, path, save_as_external_data=weights > EXTERNAL_DATA_BYTES,
                    location=f"{os.path.basename(path)}.data")
    return dict(zip(names, example))


def _rename_value(graph: Any, old: str, new: str) -> None:
    """Rename value ``old`` everywhere in ``graph`` (nodes, inputs, outputs, initialisers, value info)."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
        for value in collection:
            if value.name == old:
                value.name = new


def image_preprocess(tower: OpenClipImageTower) -> Dict[str, Any]:
    cfg = tower.preprocess_cfg
    height, width = _pair(tower.image_size)
    return {"size": [height, width], "mean": list(cfg.get("mean") or ()), "std": list(cfg.get("std") or ()),
            "interpolation": cfg.get("interpolation", "bicubic"), "resize_mode": cfg.get("resize_mode", "shortest"),
            "how": "RGB; resize the shorter side to size with this interpolation, centre crop to size, "
                   "float32 RGB / 255, then (x - mean) / std per channel; layout (B, 3, H, W)"}


def text_preprocess(tower: Tower, folder: str) -> Dict[str, Any]:
    """What makes ``input_ids`` (and ``attention_mask``); the tokenizer's files are copied to
    ``folder/tokenizer/``."""
    target = os.path.join(folder, TOKENIZER_SUBDIR)
    os.makedirs(target, exist_ok=True)
    if isinstance(tower, OpenClipTextTower):
        import open_clip.tokenizer as oc_tokenizer

        tokenizer = tower.tokenizer
        bpe = getattr(tokenizer, "bpe_path", None) or oc_tokenizer.default_bpe()
        if not isinstance(tokenizer, oc_tokenizer.SimpleTokenizer):
            raise RunError(f"the text tower's tokenizer is {type(tokenizer).__name__}; ONNX export copies only "
                           "open_clip's SimpleTokenizer (CLIP BPE)")
        shutil.copyfile(bpe, os.path.join(target, os.path.basename(bpe)))
        name, context = f"{TOKENIZER_SUBDIR}/{os.path.basename(bpe)}", int(tower.trunk.context_length)
        return {"kind": "open_clip.tokenizer.SimpleTokenizer", "files": [name], "context_length": context,
                "padding": "max_length", "pad_id": 0, "truncation": True,
                "how": f"SimpleTokenizer(bpe_path='{name}', context_length={context})(texts) -> int64 (B, {context})"}
    tower.tokenizer.save_pretrained(target)
    longest = int(tower.config.max_length)
    return {"kind": "transformers.AutoTokenizer", "max_length": longest, "padding": "longest (or max_length)",
            "truncation": True, "files": sorted(f"{TOKENIZER_SUBDIR}/{name}" for name in os.listdir(target)),
            "how": f"AutoTokenizer.from_pretrained('{TOKENIZER_SUBDIR}')(texts, padding=True, truncation=True, "
                   f"max_length={longest}, return_tensors='np') -> input_ids, attention_mask (as int64)"}


def audio_preprocess(tower: Tower) -> Dict[str, Any]:
    rate, samples, seconds = clip_samples(tower)
    return {"sample_rate": rate, "clip_seconds": seconds, "clip_samples": samples,
            "channels": "mono (mean of channels)", "crop": "center (longer clips: the middle clip_samples)",
            "pad": f"{tower.config.pad} (shorter clips, at the end)",
            "how": f"float32 waveform in [-1, 1] at {rate} Hz, cropped or padded to {samples} samples; "
                   "layout (B, T); the log-mel spectrogram is computed inside the graph"}


def export_onnx(towers: Dict[str, Tower], embed_dim: int, out: str, int8: bool = False,
                full_dim: Optional[int] = None) -> List[str]:
    """Write ``out/<modality>.onnx`` for each tower and ``out/preprocess.json``; with ``int8`` also
    ``out/<modality>.int8.onnx`` (align/export/quantize.py). ``full_dim``: the model's width when
    the towers were cut to a Matryoshka prefix of ``embed_dim`` (``truncated_model``). The files written."""
    from align.export.quantize import METHOD, int8_name, quantize_graph

    os.makedirs(out, exist_ok=True)
    info: Dict[str, Any] = {"format": "align-onnx/1", "embed_dim": int(embed_dim), "output": OUTPUT,
                            "output_spec": "float32 (batch, embed_dim), L2-normalised rows", "towers": {}}
    if full_dim is not None and full_dim != embed_dim:
        info["matryoshka"] = {"dim": int(embed_dim), "full_dim": int(full_dim),
                              "how": f"the first {embed_dim} of the model's {full_dim} coordinates, renormalised"}
    if int8:
        info["int8"] = METHOD
    for modality, tower in towers.items():
        path = os.path.join(out, f"{modality}.onnx")
        example = export_graph(tower, path)
        dynamic_length = isinstance(tower, HFTextTower)  # (B, tokens); the others fix all but the batch
        entry: Dict[str, Any] = {"file": f"{modality}.onnx", "tower": type(tower).__name__, "inputs": {
            name: {"dtype": str(x.dtype).replace("torch.", ""),
                   "shape": ["batch", *(["tokens"] if dynamic_length else list(x.shape[1:]))]}
            for name, x in example.items()}}
        if int8:
            entry["int8_file"] = int8_name(entry["file"])
            entry["int8_kept_float32"] = quantize_graph(path, os.path.join(out, entry["int8_file"]))["kept_float32"]
        if modality == "image":
            entry["image"] = image_preprocess(tower)
        elif modality == "text":
            entry["tokenizer"] = text_preprocess(tower, out)
        else:
            entry["audio"] = audio_preprocess(tower)
        info["towers"][modality] = entry
    write_json_atomic(info, os.path.join(out, PREPROCESS_FILE))
    return sorted(os.path.relpath(os.path.join(root, name), out) for root, _, names in os.walk(out) for name in names)


# ------------------------------------------------------------------ checking


def run_batches(path: str, names: Sequence[str], batches: Sequence[Dict[str, Any]]) -> List[Any]:
    """onnx.checker on the file, then onnxruntime on each batch in one session (the batch axis must
    be dynamic): the first output named in ``names`` per batch. A graph that fails is a ``RunError``."""
    import onnx
    import onnxruntime

    try:
        onnx.checker.check_model(path, full_check=True)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return [session.run(list(names), batch)[0] for batch in batches]
    except Exception as error:  # onnx and onnxruntime raise their own types
        raise RunError(f"{path}: does not check or run in onnxruntime ({type(error).__name__}: {error})") from None


def check_graph(path: str, batches: Sequence[Dict[str, Any]], expected: Sequence[Any]) -> float:
    """The graph at ``path`` run on each batch (``run_batches``) against ``expected``: the largest
    |difference|."""
    import numpy as np

    worst = 0.0
    for output, reference in zip(run_batches(path, [OUTPUT], batches), expected):
        if output.shape != tuple(reference.shape) or output.dtype != np.float32:
            raise RunError(f"{path}: gave {output.dtype} {output.shape}, expected float32 {tuple(reference.shape)}")
        worst = max(worst, float(np.abs(output - reference).max()))
    return worst


# ------------------------------------------------------------------ reading


def tower_feeds(modality: str, inputs: Any, spec: Dict[str, Any]) -> Dict[str, Any]:
    """A graph's numpy inputs from what our tower takes (``model.preprocessors`` stacked by the
    collate): token ids (B, L), or a dict with ``attention_mask`` for hf_text (cut to the longest
    text, as a user padding to "longest" would); images uint8 raw pixels (normalised here with
    ``spec``'s mean and std, i.e. preprocess.json's ``towers.image.image``) or float32 already
    normalised; waveforms (B, T)."""
    import numpy as np

    if modality == "image":
        pixels = inputs.numpy() if isinstance(inputs, torch.Tensor) else np.asarray(inputs)
        if pixels.dtype == np.uint8:
            mean = np.asarray(spec["image"]["mean"], np.float32).reshape(1, -1, 1, 1)
            std = np.asarray(spec["image"]["std"], np.float32).reshape(1, -1, 1, 1)
            pixels = (pixels.astype(np.float32) / np.float32(255) - mean) / std
        return {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)}
    if modality == "audio":
        return {"waveform": np.ascontiguousarray(inputs.numpy() if isinstance(inputs, torch.Tensor) else inputs,
                                                 dtype=np.float32)}
    if isinstance(inputs, dict):
        length = int(inputs["attention_mask"].sum(1).max())
        return {k: v[:, :length].numpy() for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    return {"input_ids": inputs.numpy()}


class OnnxEncoder:
    """An ``align export`` ONNX folder behind the model's encoding interface (``modalities``,
    ``embed_dim``, ``encode``, ``preprocessors``, ``eval``), so that our own evaluation
    (``align.encoding.embed_split``, ``align.eval.runner.embed_for_eval``) embeds a split through
    onnxruntime, float32 or int8, exactly as it embeds it through torch.

    Args:
        folder: the export's ``onnx/`` folder (preprocess.json and the graphs).
        precision: "float32" (``<modality>.onnx``) or "int8" (``<modality>.int8.onnx``).
        preprocessors: modality -> the model's eval preprocessor (``model.preprocessors(train=False)``),
            which make the inputs ``encode`` takes (see ``tower_feeds``); None when only ``encode`` is used.
        threads: onnxruntime intra-op threads (None: its default, every core).
    Example::

        encoder = OnnxEncoder("export/onnx", "int8", model.preprocessors(train=False), threads=1)
        embedded, _ = embed_for_eval(encoder, config, "data/demo/test.csv", Processes(0, 1, torch.device("cpu")))
    """

    def __init__(self, folder: str, precision: Precision = "float32",
                 preprocessors: Optional[Dict[str, Any]] = None, threads: Optional[int] = None) -> None:
        import onnxruntime

        from align.loading import read_json

        spec_path = os.path.join(folder, PREPROCESS_FILE)
        if not os.path.isfile(spec_path):
            raise RunError(f"{spec_path}: missing; give the onnx/ folder of an `align export`")
        self.spec = read_json(spec_path)
        key = {"float32": "file", "int8": "int8_file"}[precision]
        towers = self.spec["towers"]
        missing = [m for m, entry in towers.items() if key not in entry]
        if missing:
            raise RunError(f"{spec_path}: no {precision} graph for {missing}; export with --quantize int8")
        self.files = {m: os.path.join(folder, entry[key]) for m, entry in towers.items()}
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.sessions = {m: onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                         for m, path in self.files.items()}
        self.embed_dim = int(self.spec["embed_dim"])
        self.precision = precision
        self._preprocessors = preprocessors

    @property
    def modalities(self) -> List[str]:
        return list(self.sessions)

    def eval(self) -> "OnnxEncoder":
        return self

    def preprocessors(self, train: bool = False) -> Dict[str, Any]:
        if self._preprocessors is None or train:
            raise RunError("this OnnxEncoder was built without the model's eval preprocessors")
        return self._preprocessors

    def feeds(self, modality: str, inputs: Any) -> Dict[str, Any]:
        """The graph's numpy inputs for ``inputs`` (``tower_feeds``)."""
        return tower_feeds(modality, inputs, self.spec["towers"][modality])

    def encode(self, modality: str, inputs: Any) -> torch.Tensor:
        """(B, embed_dim) float32 unit rows, from onnxruntime."""
        if modality not in self.sessions:
            raise KeyError(f"this export has no {modality!r} graph; it has {self.modalities}")
        return torch.from_numpy(self.sessions[modality].run([OUTPUT], self.feeds(modality, inputs))[0])

    def graph_bytes(self) -> int:
        """Bytes on disk of the graphs this encoder runs (external weight files included)."""
        from align.export.quantize import graph_bytes

        return sum(graph_bytes(path) for path in self.files.values())
