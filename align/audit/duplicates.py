"""Is this the same photo? A perceptual hash, a colour layout and the image embedding propose
pairs; a pixel check that undoes a crop and a resize decides.

Why a check behind the hashes. No hash tells a re-encoded crop of a photo from another photo of a
look-alike product: on the demo catalogue (up to 13 renders of one attribute combination: the same
shape, colour and size at another position, rotation and background tint) the pHash distance
between distinct look-alike renders reaches 0 bits, while a JPEG re-encode of a 10% crop of one
photo lies up to ~30 bits from it. So the signatures only *propose* candidate pairs, cheaply, and
each candidate is verified on the pixels:

1. **Signatures** (``ImageDigests``), a multi-hash of each readable photo:

   - ``perceptual_hash``: DCT pHash of the central 80% of the photo (a crop of up to 10% keeps
     that region in frame): grey, 32 x 32, 2-D DCT-II, the 8 x 8 lowest frequencies without the DC
     term (63 coefficients), a bit per coefficient above their median;
   - a colour layout: the mean colour of each cell of an 8 x 8 grid (192 numbers);
   - a 64 x 64 canonical copy for the check, and the file's aspect ratio.

2. **Candidates** (``candidate_pairs``): pairs whose pHashes differ in at most ``max_hamming``
   bits, or one of which is among the other's ``layout_neighbours`` nearest colour layouts, or
   ``embedding_neighbours`` nearest photos by image-embedding cosine. On the demo the colour layout
   finds 99% of planted duplicates among the 12 nearest, the pHash within 6 bits about a third, the
   demo model's embedding (trained to see look-alikes as one product) fewer; the hash and the
   embedding catch what a colour change hides from the layout. Together they keep the check to
   about ten candidates per photo.
3. **Check** (``compare_pairs``): the crop and resize that map one photo onto the other are
   estimated from the photos' column and row profiles of brightness and edges (a crop plus a resize acts on
   each axis alone as ``a = offset + scale * u``; scales 0.88-1.14, so either photo may be the
   crop), the first photo is warped onto the second, and the pair is the same photo when

   - the two axes' scales agree with the files' aspect ratios (``aspect_error``: a resize keeps
     the aspect; lining up a look-alike shifted one way needs a one-axis stretch),
   - the aligned photos agree in coarse structure (``structure``: mean absolute difference of
     8 x 8-pixel cell means, grey levels 0-255, at 64 x 64), and
   - they share their fine grain (``grain``: correlation of the high-pass residuals, photo minus
     its 5 x 5 box blur, over the flat regions of both: sensor noise and texture, which only
     copies of one photo share; distinct renders correlate at 0, never above 0.09), strongly on its own
     (``min_grain``), or weakly (``weak_grain``) with the same colours (``colour_shift``: the
     largest per-channel mean difference over those flat regions, where JPEG keeps colours and a
     different background tint shows).

The thresholds (``DuplicateThresholds``) are in pixels and grey levels, not in cosines of a
particular checkpoint. They were set on the demo catalogue, every pair of distinct renders of one
combination (20 290 pairs: none passes) against 300 copies cropped by up to 10%, resized 0.75-1.5x
and re-encoded as JPEG at quality 60-90 (99% pass). A copy shrunk and re-encoded hard keeps little
grain and is missed more often (share found at quality 90 / 75 / 60 / 50 / 30, with the same crops
and resizes: 0.99 / 0.97 / 0.92 / 0.84 / 0.35): the check prefers missing a duplicate to merging
two products.

Two items without photos are duplicates when their texts are identical and so are their sounds
(the same file's bytes, or neither has one): nothing else could tell them apart
(``text_duplicates``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

CANONICAL = 64  # side of the canonical copy every photo is compared at, pixels
LAYOUT = 8  # the colour layout's grid
HASH_SIDE = 32  # the hash's DCT input, pixels
HASH_CENTRE = 0.8  # share of each side the hash looks at (a crop of <= 10% keeps it in frame)
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as PIL's "L" mode
COARSE_SCALE_STEP, COARSE_OFFSET_STEP = 0.02, 0.01  # the alignment's first search grid ...
REFINED = 4  # ... and how many of its best options are refined
PROFILE_MARGIN = 0.04  # share of B's profile left out at each end (the edges of a large shape lie just inside)


@dataclass(frozen=True)
class DuplicateThresholds:
    """Which pairs are checked, and when a checked pair is the same photo (module docstring); each
    field's ``help`` says what it bounds (``align audit --help`` shows them)."""

    max_hamming: int = field(default=6, metadata={"help": "candidate when the pHashes differ in at most this many of "
                                                          "63 bits"})
    layout_neighbours: int = field(default=12, metadata={"help": "candidate when one photo is among the other's this "
                                                                 "many nearest colour layouts"})
    embedding_neighbours: int = field(default=2, metadata={"help": "candidate when one photo is among the other's "
                                                                   "this many nearest by image-embedding cosine"})
    max_crop: float = field(default=0.10, metadata={"help": "the largest crop of a side still called the same photo"})
    max_aspect_error: float = field(default=0.05, metadata={
        "help": "how far the two axes' scales may disagree with the files' aspect ratios (relative; rounding a small "
                "resized photo to whole pixels moves its aspect ~2%%)"})
    max_structure: float = field(default=4.0, metadata={"help": "mean absolute difference of 8 x 8-cell means after "
                                                                "alignment, grey levels"})
    min_grain: float = field(default=0.10, metadata={"help": "grain correlation that makes a pair the same photo on "
                                                             "its own"})
    weak_grain: float = field(default=0.05, metadata={"help": "grain correlation that does so together with "
                                                              "--max-colour-shift"})
    max_colour_shift: float = field(default=1.0, metadata={"help": "largest per-channel mean difference over flat "
                                                                   "regions, grey levels"})


def dct_matrix(n: int) -> np.ndarray:
    """(n, n) orthonormal DCT-II matrix: ``D @ x`` is the DCT of the column ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix


_DCT = dct_matrix(HASH_SIDE)


def perceptual_hash(image) -> int:
    """63-bit DCT pHash of the central ``HASH_CENTRE`` of a PIL image (module docstring)."""
    from PIL import Image

    width, height = image.size
    margin_x, margin_y = width * (1 - HASH_CENTRE) / 2, height * (1 - HASH_CENTRE) / 2
    centre = image.crop((round(margin_x), round(margin_y), round(width - margin_x), round(height - margin_y)))
    grey = np.asarray(centre.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.BILINEAR), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].reshape(-1)[1:]  # (63,) lowest frequencies, DC left out
    bits = low > np.median(low)
    return int(sum(1 << n for n, bit in enumerate(bits) if bit))


def canonical_pixels(image) -> np.ndarray:
    """(3, CANONICAL, CANONICAL) uint8: an RGB PIL image squeezed to the canonical square (antialiased)."""
    from PIL import Image

    return np.asarray(image.resize((CANONICAL, CANONICAL), Image.BILINEAR), dtype=np.uint8).transpose(2, 0, 1)


@dataclass
class ImageDigests:
    """What the duplicate search keeps of each readable photo (12 KB each).

    Attributes:
        rows: (M,) int64, the catalogue row of each photo.
        hashes: (M,) uint64 perceptual hashes.
        pixels: (M, 3, C, C) uint8 canonical copies.
        aspects: (M,) float64 width / height of the file as stored.
        profiles: (M, 2, 2, C) float32 profiles of the canonical copy, per axis (horizontal, vertical)
            two kinds: the mean grey of each column (row), and the mean absolute grey step along
            the axis (its edges: sharp where the grey profile of a smooth shape is flat).
    """

    rows: np.ndarray
    hashes: np.ndarray
    pixels: np.ndarray
    aspects: np.ndarray
    profiles: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.profiles is None:
            self.profiles = _profiles(_grey(torch.from_numpy(self.pixels).float())).numpy()

    @classmethod
    def build(cls, photos: Iterable[Tuple[int, object]]) -> "ImageDigests":
        """Digests of (catalogue row, PIL RGB image) pairs, each image dropped once digested."""
        rows, hashes, pixels, aspects = [], [], [], []
        for row, image in photos:
            rows.append(row)
            hashes.append(perceptual_hash(image))
            pixels.append(canonical_pixels(image))
            aspects.append(image.size[0] / image.size[1])
        return cls(np.asarray(rows, dtype=np.int64), np.asarray(hashes, dtype=np.uint64),
                   np.stack(pixels) if pixels else np.zeros((0, 3, CANONICAL, CANONICAL), np.uint8),
                   np.asarray(aspects, dtype=np.float64))

    def layouts(self) -> torch.Tensor:
        """(M, 3 * LAYOUT * LAYOUT) float32 colour layouts: the mean colour of each grid cell."""
        pixels = torch.from_numpy(self.pixels).float()
        return F.avg_pool2d(pixels, CANONICAL // LAYOUT).flatten(1)


def hamming(hashes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """(len(hashes), len(others)) int: bits in which each pair of 64-bit hashes differs."""
    xor = hashes[:, None] ^ others[None, :]  # (A, B) uint64
    as_bytes = xor.view(np.uint8).reshape(*xor.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(-1, dtype=np.int64)


def _nearest(vectors: torch.Tensor, start: int, stop: int, k: int, by_distance: bool) -> np.ndarray:
    """(stop - start, k) indices of the nearest other rows of ``vectors`` to rows start..stop."""
    block = -torch.cdist(vectors[start:stop], vectors) if by_distance else vectors[start:stop] @ vectors.T
    block[torch.arange(stop - start), torch.arange(start, stop)] = -math.inf  # not itself
    return block.topk(min(k, len(vectors) - 1), dim=1).indices.numpy()


def candidate_pairs(digests: ImageDigests, vectors: Optional[torch.Tensor], thresholds: DuplicateThresholds,
                    chunk: int = 1024) -> np.ndarray:
    """(P, 2) int64 pairs (i < j) of digest indices worth checking (module docstring, stage 2);
    ``vectors``: (M, D) unit image embeddings of the digests' rows, or None."""
    count = len(digests.rows)
    layouts = digests.layouts()
    found: List[np.ndarray] = [np.zeros((0, 2), np.int64)]
    for start in range(0, count, chunk):  # blocks of rows: the whole (M, M) matrix may not fit
        stop = min(start + chunk, count)
        i, j = np.nonzero(hamming(digests.hashes[start:stop], digests.hashes) <= thresholds.max_hamming)
        found.append(np.stack([i + start, j], 1))
        for source, k, by_distance in ((layouts, thresholds.layout_neighbours, True),
                                       (vectors, thresholds.embedding_neighbours, False)):
            if source is not None and k > 0 and count > 1:
                top = _nearest(source, start, stop, k, by_distance)  # (c, k)
                found.append(np.stack([np.repeat(np.arange(start, stop), top.shape[1]), top.reshape(-1)], 1))
    pairs = np.sort(np.concatenate(found), axis=1)
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    return np.unique(pairs, axis=0).astype(np.int64)


def text_duplicates(groups: np.ndarray, eligible: np.ndarray, sounds: Sequence[Optional[str]]) -> List[Tuple[int, int]]:
    """(first, later) catalogue rows of items with identical text (``groups``) and identical sounds
    (``sounds``: a file digest or None), among the ``eligible`` ones (items with text and no photo)."""
    seen: Dict[Tuple[int, Optional[str]], int] = {}
    pairs = []
    for row in np.nonzero(eligible)[0].tolist():
        key = (int(groups[row]), sounds[row])
        if key in seen:
            pairs.append((seen[key], row))
        else:
            seen[key] = row
    return pairs


def _axis_options(max_crop: float, scale_step: float, offset_step: float) -> torch.Tensor:
    """(K, 2) (scale, offset) of one axis: photo B's coordinate u in [0, 1] is photo A's
    ``offset + scale * u``; B may be a crop of A (scale < 1) or A a crop of B (scale > 1)."""
    lowest = 1 - max_crop - 0.02  # a little beyond, so a 10% crop is not at the edge of the search
    options = [(scale, offset)
               for scale in np.arange(lowest, 1 / lowest + 1e-9, scale_step)
               for offset in np.arange(min(0.0, 1 - scale) - offset_step, max(0.0, 1 - scale) + offset_step + 1e-9,
                                       offset_step)]
    return torch.tensor(options, dtype=torch.float32)


def _refinements(scale_step: float, offset_step: float) -> torch.Tensor:
    """(R, 2) small (scale, offset) changes around a coarse estimate: half its steps, finer."""
    return torch.tensor([(ds, do) for ds in np.linspace(-scale_step / 2, scale_step / 2, 5)
                         for do in np.linspace(-offset_step / 2, offset_step / 2, 5)], dtype=torch.float32)


def _warp_profiles(profiles: torch.Tensor, options: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """(P, kinds, R, S): ``profiles`` (P, kinds, L) of photo A read, by linear interpolation, at B's
    ``samples`` (S,) in [0, 1] mapped through each pair's options (P, R, 2)."""
    count, kinds, length = profiles.shape
    where = ((options[..., 1:2] + options[..., 0:1] * samples) * length - 0.5).clamp(0, length - 1)  # (P, R, S)
    left = where.floor().clamp(max=length - 2)
    frac = (where - left).unsqueeze(1)  # (P, 1, R, S)
    index = left.long().flatten(1).unsqueeze(1).expand(count, kinds, -1)  # (P, kinds, R*S): shared by the kinds
    low = profiles.gather(2, index).view(count, kinds, *where.shape[1:])
    high = profiles.gather(2, index + 1).view_as(low)
    return low + (high - low) * frac


def _interpolation(options: torch.Tensor, samples: torch.Tensor, length: int) -> torch.Tensor:
    """(L, K*S) matrix that reads a profile of ``length`` L at ``samples`` (S,) mapped through each
    of the ``options`` (K, 2), by linear interpolation: ``profiles @ it`` warps them all in one product."""
    where = ((options[:, 1:2] + options[:, 0:1] * samples) * length - 0.5).clamp(0, length - 1).reshape(-1)
    left = where.floor().long().clamp(max=length - 2)
    frac = where - left
    matrix = torch.zeros(length, where.numel())
    columns = torch.arange(where.numel())
    matrix[left, columns] = 1 - frac
    matrix[left + 1, columns] += frac
    return matrix


def _correlation(warped: torch.Tensor, target: torch.Tensor, sums: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(P, K) correlation of each warped profile (P, K, S) with the target (P, S); ``sums``: the
    warped profiles' sums over S (P, K) when known."""
    samples = target.shape[-1]
    target = target - target.mean(-1, keepdim=True)
    target = target / target.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # centred, unit: the dot skips centring
    dot = torch.bmm(warped, target[:, :, None])[..., 0]  # (P, K)
    mean = (warped.sum(-1) if sums is None else sums) / samples
    spread = (warped.pow(2).sum(-1) - samples * mean * mean).clamp_min(0).sqrt()
    return dot / spread.clamp_min(1e-6)


def _best_axis(profile_a: torch.Tensor, profile_b: torch.Tensor, max_crop: float) -> torch.Tensor:
    """(P, 2) (scale, offset) per pair that best maps B's profiles (P, 2, L: grey and edges) onto A's,
    by their mean correlation: every option of a coarse grid on half-length profiles, then a finer
    grid around its ``REFINED`` best at full length (a smooth profile lets scale and offset trade off,
    so the best coarse option need not lie next to the true one).

    Each option sees the same samples of B, all but its outer ``PROFILE_MARGIN`` (where it maps
    outside A, A's border value stands in: a few samples at the largest scales searched)."""
    count, kinds, length = profile_a.shape

    def window(profile: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(samples kept (S,), the profiles (P*2, L), their kept samples (P*2, S))."""
        size = profile.shape[-1]
        u = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        keep = (u >= PROFILE_MARGIN) & (u <= 1 - PROFILE_MARGIN)
        return u[keep], profile.reshape(count * kinds, size), profile[..., keep].reshape(count * kinds, -1)

    def score(warped: torch.Tensor, target: torch.Tensor, sums: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _correlation(warped, target, sums).view(count, kinds, -1).mean(1)  # (P, K)

    def halved(profile: torch.Tensor) -> torch.Tensor:
        return F.avg_pool1d(profile.reshape(count * kinds, 1, length), 2).view(count, kinds, -1)

    samples, half_a, _ = window(halved(profile_a))
    _, _, half_target = window(halved(profile_b))
    coarse = _axis_options(max_crop, COARSE_SCALE_STEP, COARSE_OFFSET_STEP)  # (K, 2)
    matrix = _interpolation(coarse, samples, half_a.shape[-1])  # (L/2, K*S)
    warped = (half_a @ matrix).view(count * kinds, len(coarse), -1)  # (P*2, K, S)
    sums = half_a @ matrix.view(half_a.shape[-1], len(coarse), -1).sum(-1)  # (P*2, K)
    best = coarse[score(warped, half_target, sums).topk(REFINED, dim=-1).indices]  # (P, REFINED, 2)
    fine = (best[:, :, None] + _refinements(COARSE_SCALE_STEP, COARSE_OFFSET_STEP)[None, None]).flatten(1, 2)
    samples, _, _ = window(profile_a)
    _, _, target = window(profile_b)
    fine_scores = score(_warp_profiles(profile_a, fine, samples).flatten(0, 1), target)
    return fine[torch.arange(count), fine_scores.argmax(-1)]


def _profiles(grey: torch.Tensor) -> torch.Tensor:
    """(M, 2, 2, C) profiles of (M, C, C) grey photos (``ImageDigests.profiles``)."""
    step_x = F.pad((grey[:, :, 1:] - grey[:, :, :-1]).abs(), (0, 1), mode="replicate")  # (M, C, C)
    step_y = F.pad((grey[:, 1:, :] - grey[:, :-1, :]).abs()[:, None], (0, 0, 0, 1), mode="replicate")[:, 0]
    horizontal = torch.stack([grey.mean(1), step_x.mean(1)], 1)  # (M, 2, C): over the rows
    vertical = torch.stack([grey.mean(2), step_y.mean(2)], 1)  # over the columns
    return torch.stack([horizontal, vertical], 1)


def _grey(pixels: torch.Tensor) -> torch.Tensor:
    """(P, 3, H, W) -> (P, H, W) luma."""
    return torch.einsum("pchw,c->phw", pixels, torch.tensor(GREY, dtype=pixels.dtype))


def _flat(grey: torch.Tensor) -> torch.Tensor:
    """(P, 1, H, W) bool: pixels whose 5 x 5 neighbourhood (of the 3 x 3-smoothed photo) spans < 12
    grey levels: away from edges, where noise and colour can be compared."""
    smooth = _box(grey, 3)
    spread = F.max_pool2d(smooth, (1, 5), 1, (0, 2))  # separable 5 x 5 maximum and minimum
    spread = F.max_pool2d(spread, (5, 1), 1, (2, 0))
    lowest = -F.max_pool2d(F.max_pool2d(-smooth, (1, 5), 1, (0, 2)), (5, 1), 1, (2, 0))
    return spread - lowest < 12


def _box(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (size // 2,) * 4, mode="replicate"), size, stride=1)


def _align(profiles_a: torch.Tensor, profiles_b: torch.Tensor, aspects: torch.Tensor,
           max_crop: float) -> Dict[str, torch.Tensor]:
    """Estimated crop + resize from A to B, from their profiles (P, 2, 2, C): per-axis (scale, offset)
    ``x`` and ``y`` (P, 2), ``aspect_error`` (P,) against the files' aspect ratios (``aspects`` =
    aspect_b / aspect_a) and ``crop`` (P,), the larger share of a side that one photo lacks."""
    x = _best_axis(profiles_a[:, 0], profiles_b[:, 0], max_crop)  # column profiles: the horizontal axis
    y = _best_axis(profiles_a[:, 1], profiles_b[:, 1], max_crop)  # row profiles: the vertical axis
    # A resize keeps the aspect ratio: scale_x / scale_y = aspect_b / aspect_a
    aspect_error = ((x[:, 0] / y[:, 0]) / aspects - 1).abs()
    crop = torch.maximum(1 - torch.minimum(x[:, 0], 1 / x[:, 0]), 1 - torch.minimum(y[:, 0], 1 / y[:, 0]))
    return {"x": x, "y": y, "aspect_error": aspect_error, "crop": crop}


def _warp(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A (P, 3, C, C) resampled onto B's frame by the per-axis (scale, offset) ``x``, ``y`` (P, 2),
    and (P, 1, C, C) where the warped pixels fall inside A."""
    count, side = a.shape[0], a.shape[-1]
    u = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    grid_x = (x[:, 1:2] + x[:, 0:1] * u[None]) * 2 - 1  # (P, C) in grid_sample's [-1, 1]
    grid_y = (y[:, 1:2] + y[:, 0:1] * u[None]) * 2 - 1
    grid = torch.stack([grid_x[:, None, :].expand(count, side, side), grid_y[:, :, None].expand(count, side, side)], -1)
    warped = F.grid_sample(a, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return warped, (grid.abs() <= 1).all(-1)[:, None]


def _structure(warped: torch.Tensor, b: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(P,) mean absolute difference of the 8 x 8-cell means (grey levels) over whole cells inside."""
    cells = F.avg_pool2d(inside.float(), 8) > 0.99  # (P, 1, C/8, C/8)
    coarse = (F.avg_pool2d(warped, 8) - F.avg_pool2d(b, 8)).abs() * cells
    return coarse.sum((1, 2, 3)) / (3 * cells.sum((1, 2, 3))).clamp_min(1)


def _fine_evidence(warped: torch.Tensor, b: torch.Tensor, inside: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``colour_shift`` and ``grain`` (P,) of aligned photos (module docstring, stage 3)."""
    grey_warped, grey_b = _grey(warped)[:, None], _grey(b)[:, None]
    flat = (_flat(grey_warped) & _flat(grey_b) & inside).float()  # (P, 1, C, C)
    flat_count = flat.sum((1, 2, 3))
    shift = (((warped - b) * flat).sum((2, 3)) / flat_count.clamp_min(1)[:, None]).abs().amax(-1)  # (P,)
    shift = torch.where(flat_count > 0, shift, torch.full_like(shift, 255.0))  # nothing flat: no colour evidence
    return {"colour_shift": shift, "grain": _grain(grey_warped, grey_b, flat)}


def compare_pairs(digests: ImageDigests, pairs: np.ndarray, thresholds: DuplicateThresholds,
                  chunk: int = 1024, progress: bool = False) -> Dict[str, np.ndarray]:
    """Check candidate ``pairs`` (P, 2) of digest indices (module docstring, stage 3).

    Returns (P,) arrays: ``same`` (bool), the estimated ``crop`` and ``aspect_error``; ``structure``
    for the pairs whose alignment keeps the aspect, and ``colour_shift`` and ``grain`` for those
    whose structure also agrees (NaN where a test was not reached: not the same photo).
    """
    keys = ("crop", "aspect_error", "structure", "colour_shift", "grain")
    out = {key: np.full(len(pairs), np.nan) for key in keys}
    starts = range(0, len(pairs), chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="check duplicate candidates", unit="chunk", leave=False)
    for start in starts:
        part = pairs[start:start + chunk]
        aspects = torch.from_numpy(digests.aspects[part[:, 1]] / digests.aspects[part[:, 0]]).float()
        aligned = _align(torch.from_numpy(digests.profiles[part[:, 0]]), torch.from_numpy(digests.profiles[part[:, 1]]),
                         aspects, thresholds.max_crop)
        rows = slice(start, start + len(part))
        out["crop"][rows], out["aspect_error"][rows] = aligned["crop"].numpy(), aligned["aspect_error"].numpy()
        # Each test runs on the pairs that passed the cheaper one before it; the rest stay NaN (not the same).
        keep = (aligned["aspect_error"] <= thresholds.max_aspect_error).nonzero().flatten()  # else: not a resize
        a = torch.from_numpy(digests.pixels[part[keep.numpy(), 0]]).float()  # (P', 3, C, C)
        b = torch.from_numpy(digests.pixels[part[keep.numpy(), 1]]).float()
        warped, inside = _warp(a, aligned["x"][keep], aligned["y"][keep])
        structure = _structure(warped, b, inside)
        out["structure"][start + keep.numpy()] = structure.numpy()
        close = (structure <= thresholds.max_structure).nonzero().flatten()
        for key, value in _fine_evidence(warped[close], b[close], inside[close]).items():
            out[key][start + keep[close].numpy()] = value.numpy()
    with np.errstate(invalid="ignore"):  # NaN compares False: not the same photo
        weak = (out["grain"] >= thresholds.weak_grain) & (out["colour_shift"] <= thresholds.max_colour_shift)
        out["same"] = ((out["aspect_error"] <= thresholds.max_aspect_error)
                       & (out["structure"] <= thresholds.max_structure)
                       & ((out["grain"] >= thresholds.min_grain) | weak))
    return out


def _grain(a: torch.Tensor, b: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(P,) correlation of the two photos' high-pass residuals (photo minus its 5 x 5 box blur) over
    their common flat pixels: sensor noise and texture, which only copies of one photo share."""
    mask = flat.float()
    count = mask.sum((1, 2, 3)).clamp_min(1)
    residual_a, residual_b = (a - _box(a, 5)) * mask, (b - _box(b, 5)) * mask
    residual_a = (residual_a - (residual_a.sum((1, 2, 3)) / count)[:, None, None, None]) * mask
    residual_b = (residual_b - (residual_b.sum((1, 2, 3)) / count)[:, None, None, None]) * mask
    norms = residual_a.pow(2).sum((1, 2, 3)).sqrt() * residual_b.pow(2).sum((1, 2, 3)).sqrt()
    return (residual_a * residual_b).sum((1, 2, 3)) / norms.clamp_min(1e-6)


def duplicate_groups(count: int, pairs: Sequence[Tuple[int, int]]) -> List[List[int]]:
    """Connected groups (each sorted, size >= 2) of ``count`` items joined by ``pairs`` (union-find)."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: Dict[int, List[int]] = {}
    for i in range(count):
        groups.setdefault(root(i), []).append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]
