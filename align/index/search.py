"""Queries in the catalogue's space: ``QueryEncoder`` turns a text, a photo or a sound into a vector
of it, ``open_catalogue`` opens an index with the model that made it, and ``search`` returns the
best items of each query. ``align search`` (align/search/command.py), ``align serve``, the
recommender and the search-log evaluation use them.

A query is treated exactly like a catalogue item of its modality: an uploaded photo or sound is
decoded by the same readers as the catalogue's files (``align/data/manifest.py``: ``open_image``,
``open_audio``), preprocessed by the model's own eval preprocessors and stacked by the training
collate, so a query made of an item's own photo gets that item's image vector.

The index is an ``align index`` folder or an ``align embed`` items folder (exact search over its
fused vectors, ``align.index.build.open_index``). The model defaults to the checkpoint recorded
with the vectors; another one must embed into the same dimension (and should be the same model:
vectors of two models share a size, not a space).
"""
from __future__ import annotations

import io
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from align.data.manifest import open_audio, open_image
from align.data.sample import BadSample, collate
from align.errors import MODALITIES, ConfigError
from align.loading import load_model, model_folder
from align.model import check_prefix_dim, prefix

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]
# A query photo's most pixels (8000 x 8000). Its header is read before decoding: a PNG of one colour
# compresses a thousandfold, so a 160 KiB upload of 13000 x 13000 px decodes to ~800 MiB.
MAX_QUERY_PIXELS = 64_000_000


class QueryError(ConfigError):
    """A query that cannot be encoded (empty text, an unreadable photo or sound, a modality the
    model has no tower for); the message names the input. ``align search`` exits 2 on it,
    ``align serve`` answers 400."""

    def __init__(self, message: str, modality: Optional[str] = None) -> None:
        super().__init__(message)
        self.modality = modality


class FilterError(QueryError):
    """A ``where`` filter the index cannot apply (a field its metadata does not keep)."""


class QueryEncoder:
    """A model loaded once (eval mode, no gradients) that turns queries into unit vectors.

    Args:
        checkpoint: a checkpoint, its ``model/`` folder or a run folder (align/loading.py).
        device: where the towers run; default cuda when available.
        dim: a Matryoshka width to cut the vectors to (``align index --dim``).
        model: a model already in memory instead of ``checkpoint``'s (the trainer's validation):
            used as it is, its mode and gradients its owner's; ``checkpoint`` then only names it.

    ``prepare`` decodes and preprocesses one query (CPU work, per query, so one bad upload fails
    alone); ``encode_prepared`` runs ONE forward for any number of prepared queries of one
    modality; ``encode`` does both. Example::

        encoder = QueryEncoder("runs/demo")
        vectors = encoder.encode("text", ["red striped scarf", "blue shoe"])  # (2, D) float32, unit rows
        vectors = encoder.encode("image", [open("photo.jpg", "rb").read()], names=["photo.jpg"])
    """

    def __init__(self, checkpoint: str, device: Optional[Union[str, torch.device]] = None,
                 dim: Optional[int] = None, model: Optional[Any] = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model is None:
            self.checkpoint = os.path.abspath(model_folder(checkpoint))
            self.model = load_model(self.checkpoint, device=self.device)  # eval mode
            self.model.requires_grad_(False)
        else:
            self.checkpoint, self.model = os.path.abspath(checkpoint), model
        self.preprocessors = self.model.preprocessors(train=False)
        self.full_dim = int(self.model.embed_dim)
        # dim < full_dim: the index holds Matryoshka prefixes (`align index --dim`); queries are cut alike
        self.dim = self.full_dim if dim is None else check_prefix_dim(dim, self.full_dim)
        self.modalities: List[str] = list(self.model.modalities)

    def check_modality(self, modality: str) -> None:
        """A ``QueryError`` naming ``modality`` unless the model has a tower for it."""
        if modality not in MODALITIES:
            raise QueryError(f"{modality!r} is not a query modality; use one of {', '.join(MODALITIES)}", modality)
        if modality not in self.modalities:
            raise QueryError(f"this model ({self.checkpoint}) has no {modality} tower, so it cannot take "
                             f"{modality} queries; it takes {', '.join(self.modalities)}", modality)

    def prepare(self, modality: str, value: Any, name: Optional[str] = None) -> Any:
        """One query -> the model's input for it (a tensor or a dict of tensors).

        Args:
            modality: "text", "image" or "audio".
            value: the text; for image and audio a file path or the file's bytes.
            name: how errors name the input (default: the path, or "the <modality> query").
        Raises:
            QueryError naming the input for empty text, a missing file, bytes that do not decode,
            a photo of more than ``MAX_QUERY_PIXELS`` pixels (checked before it is decoded).
        """
        self.check_modality(modality)
        name = name or (os.fspath(value) if isinstance(value, (str, os.PathLike)) and modality != "text"
                        else f"the {modality} query")
        if modality == "text":
            if not isinstance(value, str) or not value.strip():
                raise QueryError(f"{name}: the text is empty; give some words to search for", modality)
            return self.preprocessors["text"](value)
        if isinstance(value, (bytes, bytearray, memoryview)) and len(value) == 0:
            raise QueryError(f"{name}: the {modality} file is empty (0 bytes)", modality)
        if modality == "image":
            check_image_pixels(value, name)
        try:
            raw = (open_image if modality == "image" else open_audio)(value, name, name)
            return self.preprocessors[modality](raw)
        except BadSample as error:
            if error.reason == "missing_file":
                raise QueryError(f"{name}: no such file", modality) from None
            raise QueryError(f"{name}: cannot be read as {modality} ({_reason(error.__cause__ or error)})",
                             modality) from None
        except Exception as error:  # a decoded file the transform cannot take (a 0-frame sound)
            raise QueryError(f"{name}: cannot be read as {modality} ({_reason(error)})", modality) from None

    @torch.no_grad()
    def encode_prepared(self, modality: str, prepared: Sequence[Any]) -> torch.Tensor:
        """(Q, D) float32 unit rows on the CPU for ``prepare``'s outputs, in one forward."""
        self.check_modality(modality)
        if not prepared:
            return torch.zeros(0, self.dim)
        # The training collate stacks them, so a query batch is shaped as the catalogue's batches were.
        inputs = collate([{"id": str(n), modality: value} for n, value in enumerate(prepared)])["inputs"][modality]
        inputs = ({k: v.to(self.device) for k, v in inputs.items()} if isinstance(inputs, dict)
                  else inputs.to(self.device))
        return prefix(self.model.encode(modality, inputs).float(), self.dim).cpu()  # (Q, dim)

    def encode(self, modality: str, values: Sequence[Any], names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """(Q, D) float32 unit rows for ``values`` of one modality (see ``prepare``), one forward."""
        names = list(names) if names is not None else [None] * len(values)
        return self.encode_prepared(modality, [self.prepare(modality, v, n) for v, n in zip(values, names)])


def check_image_pixels(value: Source, name: str) -> None:
    """A ``QueryError`` naming ``name`` when the image's header declares over ``MAX_QUERY_PIXELS``
    pixels. Only the header is read (PIL opens lazily), so the refusal costs no decoding; a file
    PIL cannot open at all is left for ``open_image`` to name."""
    from PIL import Image

    source = io.BytesIO(value) if isinstance(value, (bytes, bytearray, memoryview)) else value
    try:
        with warnings.catch_warnings():  # PIL warns past its own, larger limit; refused here anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
    except Image.DecompressionBombError as error:  # over twice PIL's limit: refused before the size is read
        raise QueryError(f"{name}: the image is too large ({error}); a query photo may have at most "
                         f"{MAX_QUERY_PIXELS:,} pixels", "image") from None
    except Exception:  # not an image, no such file: open_image says which
        return
    if width * height > MAX_QUERY_PIXELS:
        raise QueryError(f"{name}: the image is {width} x {height} = {width * height:,} pixels, over the "
                         f"{MAX_QUERY_PIXELS:,} a query photo may have; send a smaller photo", "image")


def _reason(error: BaseException) -> str:
    """The decoder's complaint, short, without the in-memory file's address PIL puts in it."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the bytes", str(error)) or type(error).__name__
    return f"{type(error).__name__}: {text[:200]}"


def check_index_fits(index: Any, encoder: QueryEncoder, index_path: str) -> None:
    """A ``ConfigError`` naming both sides when the index's vectors have another size than the model's."""
    if int(index.dim) != encoder.dim:
        raise ConfigError(f"index {index_path} holds vectors of dimension {index.dim}, but the model "
                          f"{encoder.checkpoint} embeds into {encoder.dim}: search with the checkpoint that made "
                          f"the index ({getattr(index, 'checkpoint', None) or 'not recorded'})")


def open_catalogue(index_path: str, checkpoint: Optional[str] = None,
                   device: Optional[Union[str, torch.device]] = None) -> Tuple[Any, QueryEncoder]:
    """(the index at ``index_path``, a ``QueryEncoder`` for it): the model is ``checkpoint``, or the
    one recorded with the index. ``ConfigError`` when there is none or its dimension differs."""
    from align.index.build import open_index  # lazy: faiss only where an index is opened

    if not os.path.exists(index_path):
        raise ConfigError(f"--index {index_path}: no such folder (give an `align index` or `align embed` folder)")
    index = open_index(index_path)
    checkpoint = checkpoint or getattr(index, "checkpoint", None)
    if not checkpoint:
        raise ConfigError(f"index {index_path} does not record the checkpoint that made it; give --checkpoint")
    if not os.path.isdir(checkpoint):
        raise ConfigError(f"checkpoint {checkpoint} (recorded with {index_path}): no such folder; give --checkpoint")
    info = getattr(index, "info", None) or {}
    cut = int(info["dim"]) if int(info.get("full_dim") or info.get("dim") or 0) > int(info.get("dim") or 0) else None
    encoder = QueryEncoder(checkpoint, device, dim=cut)
    check_index_fits(index, encoder, index_path)
    return index, encoder


def search(index: Any, vectors: Union[np.ndarray, torch.Tensor], k: int,
           where: Optional[Dict[str, str]] = None) -> List[List[Dict[str, Any]]]:
    """Per query row of ``vectors`` (Q, D): its best ``k`` items as ``{"id", "score"}`` (plus
    ``"metadata"`` when the index keeps some for the item), best first, fewer when fewer match."""
    queries = vectors.numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors, dtype=np.float32)
    try:
        scores, ids = index.search(queries, k, where=where or None)  # (Q, k) and Q lists
    except ValueError as error:  # the index names a filter field it does not keep
        if not where:
            raise
        raise FilterError(f"where {where}: {error}") from None
    results = []
    for row_scores, row_ids in zip(np.asarray(scores), ids):
        found = []
        for item, score in zip(row_ids, row_scores):
            entry: Dict[str, Any] = {"id": item, "score": float(score)}
            metadata = index.metadata_of(item)
            if metadata:
                entry["metadata"] = dict(metadata)
            found.append(entry)
        results.append(found)
    return results
