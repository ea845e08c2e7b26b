"""The one sample dict every reader yields, and the one collate every loader uses.

A *raw* sample is what a reader produces (manifest rows and webdataset shards alike)::

    {"id": str,                       # unique item id
     "group": str | None,             # items sharing a group are never each other's negatives
     "text": str | None,              # text fields already joined
     "image": PIL.Image.Image | CheckedJpeg | None,   # CheckedJpeg: data.image_decode: device
     "audio": (np.ndarray float32 (T,), sample_rate int) | None,   # mono waveform
     "negatives": list[str]}          # texts of explicit hard negatives (may be empty)

A missing modality is ``None`` (never an empty placeholder). ``SampleProcessor``
(align/data/transforms.py) turns the raw sample into a *processed* one inside the dataloader
workers: ``text`` becomes token tensors, ``image`` a (3, H, W) uint8 tensor (the image tower
scales and normalises it on its device; with ``data.image_pipeline: device`` a dict of the
stored-size pixels and the crop drawn for them, see align/towers/image_ops.py, which collate pads
into one (B, 3, Hmax, Wmax) uint8 tensor with (B, k) geometry tensors), ``audio`` a (T,) float
tensor at the audio tower's rate and clip length, ``negatives`` a (K, L) token tensor
plus a (K,) mask.

With ``data.image_decode: device`` as well, a JPEG sample carries its file's bytes instead of
pixels (``"jpeg"``: (n,) uint8) and the tower decodes them; ``collate_images`` then builds::

    {"jpeg": JpegBytes (kept on the host: .data (total_bytes,) uint8, .lengths (B,), 0 = pixels row),
     "pixels": (n_pixels, 3, Hmax, Wmax) uint8,     # only the rows with length 0, in row order
     "size", "box", "resize", "window", "flip", "filter": (B, k)}   # every row

each of ``jpeg`` and ``pixels`` present only when some row has one.

``collate`` stacks only the rows where a modality is present::

    {"ids": list[str],                                   # (B,)
     "texts": list[str | None],                          # raw texts (evaluation positives)
     "groups": LongTensor (B,),                          # stable hash of group id, -1 = none
     "inputs": {modality: Tensor (n_m, ...) or dict of Tensors (n_m, ...)},
     "masks": {modality: BoolTensor (B,)},               # which rows have that modality
     "negatives": {"text": tokens (B, K, L), "mask": BoolTensor (B, K)}   # only when K > 0
    }

so towers never encode placeholders, and ``inputs[m][j]`` belongs to row
``masks[m].nonzero()[j]``.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.utils.data

from align.errors import MODALITIES  # noqa: F401  (re-exported)
NO_GROUP = -1


def group_hash(group: Optional[str]) -> int:
    """Stable 63-bit id for a group string (Python's ``hash`` differs per process)."""
    if group is None or group == "":
        return NO_GROUP
    digest = hashlib.blake2b(str(group).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def pad_pixels(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, h_i, w_i) uint8 images of different sizes -> (B, 3, Hmax, Wmax), zero padded at the
    bottom and right (``data.image_pipeline: device``: each sample's ``size`` says what is real)."""
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    shape = (len(images), images[0].shape[0], height, width)
    out = _shared_out(images[0], shape)
    out = images[0].new_zeros(shape) if out is None else out.zero_()
    for index, image in enumerate(images):
        out[index, :, :image.shape[-2], :image.shape[-1]] = image
    return out


class CheckedJpeg:
    """A raw sample's JPEG that a reader checked but did not decode (``data.image_decode: device``,
    align/data/manifest.py ``open_image``): the file's bytes and its header as a PIL image opened
    lazily (size and mode, no pixels), which is all the crop draws read."""

    def __init__(self, data: bytes, header: Any) -> None:
        self.data = data
        self.header = header


class JpegBytes:
    """The JPEG files of a batch, one after another, kept on the host.

    ``data`` (total_bytes,) uint8; ``lengths`` (B,) long, one per row of the image batch, 0 where
    that row shipped pixels instead. torchvision's ``decode_jpeg`` reads its input on the host
    and, on CUDA, uploads and decodes a list in one batched call, so these bytes must not follow
    the batch to the device: ``to()`` returns the object itself, which every loop that moves a
    batch's tensors leaves alone (align/train/prefetch.py ``to_device``, align/encoding.py, DDP's
    input scatter, the dataloader's pinning thread: none of them knows this type). They stay in
    pageable memory: the decoder stages them itself, and torch's pinned-memory cache would not
    know when its asynchronous copies are done.
    """

    def __init__(self, data: torch.Tensor, lengths: torch.Tensor) -> None:
        self.data = data  # (total_bytes,) uint8
        self.lengths = lengths  # (B,) long

    def to(self, *args: Any, **kwargs: Any) -> "JpegBytes":
        return self  # stays on the host (class docstring)

    def files(self) -> List[torch.Tensor]:
        """Each JPEG row's bytes, (n_i,) uint8 views of ``data``, in row order."""
        sizes = [n for n in self.lengths.tolist() if n]
        return list(torch.split(self.data, sizes))

    @staticmethod
    def join(files: Sequence[Optional[torch.Tensor]]) -> "JpegBytes":
        """Per-row (n_i,) uint8 bytes, None for a pixels row -> one ``JpegBytes`` (in shared
        memory when built in a dataloader worker, like every other tensor of the batch)."""
        present = [f for f in files if f is not None]
        total = sum(int(f.numel()) for f in present)
        data = torch.cat(present, out=_shared_out(present[0], (total,)))
        lengths = torch.tensor([0 if f is None else int(f.numel()) for f in files], dtype=torch.long)
        return JpegBytes(data, lengths)


def collate_images(values: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
    """``data.image_pipeline: device`` samples (align/towers/image_ops.py ``ImageGeometry``) ->
    the batch of the module docstring: stored-size pixels padded, JPEG bytes joined, geometry
    stacked for every row."""
    geometry = [k for k in values[0] if k not in ("pixels", "jpeg")]
    out: Dict[str, Any] = {k: _stack([v[k] for v in values], k) for k in geometry}
    pixels = [v["pixels"] for v in values if "pixels" in v]
    if pixels:
        out["pixels"] = pad_pixels(pixels)
    if any("jpeg" in v for v in values):
        out["jpeg"] = JpegBytes.join([v.get("jpeg") for v in values])
    return out


def _stack(values: Sequence[Any], key: str = "") -> Any:
    first = values[0]
    if isinstance(first, dict):
        if "pixels" in first or "jpeg" in first:  # stored-size images (image_ops.py ImageGeometry)
            return collate_images(values)
        return {k: _stack([v[k] for v in values], k) for k in first}
    return torch.stack(list(values), out=_shared_out(first, (len(values), *first.shape)))


def _shared_out(like: torch.Tensor, shape: Sequence[int]) -> Optional[torch.Tensor]:
    """In a dataloader worker, an uninitialised CPU tensor of ``shape`` in shared memory: a batch
    built there goes to the main process as it is, where one built in private memory would be
    copied into shared memory on the way (torch's default_collate does the same). None elsewhere."""
    if like.device.type != "cpu" or torch.utils.data.get_worker_info() is None:
        return None
    storage = torch.UntypedStorage._new_shared(math.prod(int(size) for size in shape) * like.element_size())
    return like.new_empty(0).set_(storage, 0, tuple(shape))


def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack processed samples into a batch with per-modality masks (see module docstring)."""
    if not samples:
        raise ValueError("collate got an empty list of samples")
    batch: Dict[str, Any] = {
        "ids": [s["id"] for s in samples],
        "texts": [s.get("text_raw") for s in samples],
        "groups": torch.tensor([group_hash(s.get("group")) for s in samples], dtype=torch.long),
        "inputs": {},
        "masks": {},
    }
    for modality in MODALITIES:
        present = [s.get(modality) is not None for s in samples]
        batch["masks"][modality] = torch.tensor(present, dtype=torch.bool)
        if any(present):
            batch["inputs"][modality] = _stack([s[modality] for s in samples if s.get(modality) is not None])
    negatives = [s.get("negatives") for s in samples]
    if all(isinstance(n, dict) for n in negatives) and negatives and negatives[0]["mask"].numel() > 0:
        batch["negatives"] = {
            "text": _stack([n["text"] for n in negatives]),
            "mask": torch.stack([n["mask"] for n in negatives]),
        }
    return batch


def empty_batch() -> Dict[str, Any]:
    """A batch with no rows, shaped like ``collate``'s output. Loaders yield it when every sample
    of a batch was bad, so that all ranks make the same number of steps (no collective hangs)."""
    return {"ids": [], "texts": [], "groups": torch.zeros(0, dtype=torch.long), "inputs": {},
            "masks": {m: torch.zeros(0, dtype=torch.bool) for m in MODALITIES}}


def collate_with_report(processed: List[Any]) -> Dict[str, Any]:
    """Collate the good samples and carry the skip records: ``batch["bad"] = {"seen", "skipped"}``
    travels from a dataloader worker to the main process, where the loader adds it to its
    ``BadSampleTally``. A batch of bad samples only is an ``empty_batch``."""
    from align.data.bad_samples import split_bad

    good, bad = split_bad(processed)
    batch = collate(good) if good else empty_batch()
    batch["bad"] = {"seen": len(processed), "skipped": bad}
    return batch


def scatter_rows(embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n_m, D) embeddings of present rows -> (B, D) with zeros where the modality is missing."""
    full = embeddings.new_zeros(mask.shape[0], embeddings.shape[-1])  # (B, D)
    return full.index_put((mask.nonzero(as_tuple=True)[0],), embeddings)


class BadSample(ValueError):
    """A sample that cannot be used: readers and processors raise it, loaders count and skip it.

    ``reason`` is a short stable key for the tallies (``corrupt_image``, ``empty_text`` ...);
    ``where`` names the file, shard or manifest row so the user can find it.
    """

    def __init__(self, sample_id: str, reason: str, where: str = "", detail: str = "") -> None:
        self.sample_id = sample_id
        self.reason = reason
        self.where = where
        self.detail = detail
        location = f" in {where}" if where else ""
        super().__init__(f"sample {sample_id!r}{location}: {reason}" + (f" ({detail})" if detail else ""))
