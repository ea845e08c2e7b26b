"""Every media file a catalogue names, opened once by the loaders' own readers.

Photos and sounds are opened with ``open_image`` and ``open_audio`` (align/data/manifest.py), the
functions training and ``align embed`` read them with, so the audit calls a file broken exactly when
the model could not use it: ``missing`` when the path names no file, ``unreadable`` when it does not
decode. A file that decodes but that the model's preprocessing refused (a sound of no samples, say)
shows up as a modality the embedding lacks, and is ``unreadable`` too. Nothing here raises on a bad
file: each one is a ``MediaProblem``.

Readable photos are digested for the duplicate search on the way (align/audit/duplicates.py), and
sounds of items without a photo are fingerprinted (SHA-256 of the bytes), the only way to tell
such items apart when their texts are the same.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from align.audit.duplicates import ImageDigests
from align.data.manifest import open_audio, open_image
from align.data.sample import BadSample
from align.export.card import sha256  # the model card's file hash: one helper for both

WORDS = {"image": "photo", "audio": "sound"}


@dataclass(frozen=True)
class MediaProblem:
    """A media file an item names that the model cannot use.

    Attributes:
        row: the item's catalogue row.
        modality: "image" or "audio".
        flag: "missing" (no such file) or "unreadable" (it does not decode, or the model's
            preprocessing refused it).
        path: the file, as the loader opens it.
        detail: the reader's complaint.
    """

    row: int
    modality: str
    flag: str
    path: str
    detail: str


@dataclass
class Media:
    """What the media pass found (module docstring).

    Attributes:
        digests: the readable photos' digests.
        problems: every missing or unreadable file.
        sounds: per row, the SHA-256 of the item's sound when it has no photo and a readable
            sound, else None.
    """

    digests: ImageDigests
    problems: List[MediaProblem]
    sounds: List[Optional[str]]


def read_media(rows: Sequence[Dict[str, Any]], roots: Sequence[str], progress: bool = True) -> Media:
    """Open every photo and sound of ``rows`` (``read_manifest`` rows; ``roots[i]`` is row i's media
    folder). Photos are digested as they are read, one at a time."""
    problems: List[MediaProblem] = []
    sounds: List[Optional[str]] = [None] * len(rows)

    def photos() -> Iterator[Tuple[int, Any]]:
        for row, item in _progress(list(enumerate(rows)), progress, "read photos"):
            image = _open(row, item, roots[row], "image", problems)
            if image is not None:
                yield row, image

    digests = ImageDigests.build(photos())
    for row, item in _progress(list(enumerate(rows)), progress, "read sounds"):
        if _open(row, item, roots[row], "audio", problems) is not None and not item.get("image"):
            sounds[row] = sha256(os.path.join(roots[row], item["audio"]))
    return Media(digests, problems, sounds)


def _open(row: int, item: Dict[str, Any], root: str, modality: str, problems: List[MediaProblem]) -> Optional[Any]:
    """The decoded file of ``item``'s ``modality`` (None when the cell is empty or the file is
    bad, then recorded in ``problems``)."""
    cell = item.get(modality)
    if not cell:
        return None
    path = os.path.join(root, cell)
    try:
        return (open_image if modality == "image" else open_audio)(path, item["id"], item.get("_where", ""))
    except BadSample as error:
        flag = "missing" if error.reason == "missing_file" else "unreadable"
        problems.append(MediaProblem(row, modality, flag, path, error.detail or error.reason))
        return None


def refused_by_model(rows: Sequence[Dict[str, Any]], roots: Sequence[str], masks: Dict[str, Any],
                     problems: Sequence[MediaProblem]) -> List[MediaProblem]:
    """Files that decoded here but that the embedding lacks (``masks``: modality -> (N,) bool of
    ``align embed``): the model's preprocessing refused them."""
    known = {(p.row, p.modality) for p in problems}
    found = []
    for modality in WORDS:
        if modality not in masks:
            continue
        for row, has in enumerate(masks[modality].tolist()):
            if not has and rows[row].get(modality) and (row, modality) not in known:
                found.append(MediaProblem(row, modality, "unreadable", os.path.join(roots[row], rows[row][modality]),
                                          f"decodes, but the model's {modality} preprocessing refused it"))
    return found


def _progress(items: List, shown: bool, label: str) -> Any:
    if not shown:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="item", leave=False)
