"""Image geometry split in two: parameters drawn in the dataloader workers, pixels moved on the
model's device for the whole batch (``data.image_pipeline: device``).

The worker path runs open_clip's PIL transform per image in the workers (crop, resize, flip)
and ships (3, S, S) uint8. The device path ships the decoded image as stored, uint8, plus the
few numbers that transform would have drawn for it; the tower then crops, resizes, flips and
normalises on its device. Both give the same pixels up to interpolation rounding
(tests/test_image_pipeline.py):

- ``ImageGeometry`` (worker side, picklable) reads a torchvision ``Compose`` step by step and,
  per image, draws what each step draws, from the same torch generator and in the same order as
  the steps themselves (``RandomResizedCrop.get_params``, ``torch.rand(1) < p`` for a flip), so
  the per-sample seed of ``seeded_sample`` (align/data/manifest.py) picks the same crop box and
  flip on both paths, and a resumed run redoes them.
- ``resized_crops`` (device side, pure torch) applies them to the batch's images, one (3, h, w)
  tensor each: rows of the padded (n, 3, Hmax, Wmax) pixels batch, or JPEGs decoded on the device.

``data.image_decode: device`` moves the decode too: a reader checks a JPEG without decoding it
whole (align/data/manifest.py ``check_jpeg``), ``ImageGeometry`` draws the crop from its header
(the draws read only the stored size) and ships its bytes, and ``stored_images`` decodes the
batch's JPEGs in one ``torchvision.io.decode_jpeg`` call on the tower's device: nvJPEG on CUDA
(batched, on the GPU's JPEG engines where it has them), libjpeg on a CPU run, where it only moves
the decode from the workers to the main process. The pixels equal PIL's on the CPU (both are
libjpeg-turbo with the accurate integer IDCT and fancy upsampling; tests/test_image_decode.py);
nvJPEG's IDCT and chroma upsampling are its own and may differ by a few levels.

Every supported transform is one chain per image::

    crop box (top, left, h, w) of the stored image -> resize to (rh, rw) -> window (top, left)
    of the output size (outside the resized image: fill 0) -> optional horizontal flip

RandomResizedCrop is (box, output size, window 0); Resize + CenterCrop is (whole image, resized
size, centred window); open_clip's ``longest`` mode is a window reaching past the image (its pad).

Resizing follows PIL's (what the worker path uses): separable, width pass first, then height,
with PIL's filters (bicubic a = -0.5, bilinear = triangle) widened by the scale when shrinking,
which is torch's ``antialias=True`` kernel in both directions; each pass is clamped to [0, 255]
as PIL clamps its uint8 intermediate. What remains is PIL's rounding to uint8 after each pass.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from align.data.sample import CheckedJpeg
from align.errors import ConfigError

log = logging.getLogger(__name__)
FILTERS = ("bilinear", "bicubic")  # index = the ``filter`` number a sample carries
KEY = "data.image_pipeline"
Size = Tuple[int, int]


def _pair(size: Union[int, Sequence[int]]) -> Size:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def _filter(interpolation: Any) -> int:
    name = getattr(interpolation, "value", str(interpolation)).lower()
    if name not in FILTERS:
        raise ConfigError(f"{KEY}: device resizing knows {FILTERS}, not {name!r}; set {KEY}: worker")
    return FILTERS.index(name)


def shorter_side_size(height: int, width: int, size: Sequence[int], max_size: Any) -> Size:
    """torchvision ``Resize``'s output size (its ``_compute_resized_output_size``, copied: the
    long side is truncated, not rounded, and ``max_size`` caps it)."""
    if len(size) == 2:
        return size[0], size[1]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size[0], int(size[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def centre_window(height: int, width: int, crop: Size) -> Size:
    """(top, left) of a centred ``crop`` in a (height, width) image; negative where the crop is
    larger (torchvision's ``center_crop`` and open_clip's ``center_crop_or_pad`` pad first, by
    ``(crop - size) // 2`` before the image)."""
    def offset(length: int, want: int) -> int:
        return -((want - length) // 2) if want > length else int(round((length - want) / 2.0))

    return offset(height, crop[0]), offset(width, crop[1])


def _is_rgb_step(step: Any) -> bool:
    """open_clip's ``MaybeConvertMode`` (RGB) and its older ``_convert_to_rgb`` function."""
    return type(step).__name__ == "MaybeConvertMode" or getattr(step, "__name__", "") == "_convert_to_rgb"


class ImageGeometry:
    """Picklable worker-side preprocessor: PIL image -> its uint8 pixels + the drawn geometry.

    Returns ``{"pixels": (3, H, W) uint8, "size": (2,) (H, W), "box": (4,) (top, left, h, w),
    "resize": (2,) (rh, rw), "window": (2,) (top, left), "flip": () bool, "filter": () long}``
    (collated by align/data/sample.py into a padded (B, 3, Hmax, Wmax) batch and (B, k) tensors).
    A ``CheckedJpeg`` (``data.image_decode: device``) gives ``"jpeg"``: its (n,) uint8 bytes in
    place of ``"pixels"``, with the same draws (they read only the stored size, from its header).

    Raises ``ConfigError`` naming ``data.image_pipeline`` for a transform with a step it cannot
    move to the device (colour jitter, grayscale, timm's whole-transform objects, ...).
    """

    takes_jpeg_bytes = True  # align/data/transforms.py with_image_decode

    def __init__(self, transform: Callable) -> None:
        steps = list(getattr(transform, "transforms", [transform]))
        if len(steps) < 2 or type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor") \
                or type(steps[-1]).__name__ != "Normalize":
            raise ConfigError(f"{KEY}: device needs a torchvision Compose ending in ToTensor + Normalize; "
                              f"got {type(transform).__name__}; set {KEY}: worker")
        # RGB conversion steps do nothing here: the image is converted first, as every reader does
        self.steps = [step for step in steps[:-2] if not _is_rgb_step(step)]
        for step in self.steps:
            self._check(step)
        self._check_order()

    def _check_order(self) -> None:
        """One chain per image (module docstring): at most one resize, a centred crop after it,
        a flip last. Checked here, not per image, where an error would only skip samples."""
        from torchvision import transforms as T

        resized = cropped = flipped = False
        for step in self.steps:
            name = type(step).__name__
            if isinstance(step, T.RandomHorizontalFlip):
                flipped = True
                continue
            crop = isinstance(step, T.CenterCrop) or name == "CenterCropOrPad"
            if flipped or cropped or (resized and not crop):
                raise ConfigError(f"{KEY}: cannot move {[type(s).__name__ for s in self.steps]} to the device "
                                  f"(one resize, then a centred crop, then a flip); set {KEY}: worker")
            resized, cropped = resized or not crop, cropped or crop

    @staticmethod
    def _check(step: Any) -> None:
        from torchvision import transforms as T

        name = type(step).__name__
        if isinstance(step, (T.RandomResizedCrop, T.Resize, T.CenterCrop, T.RandomHorizontalFlip)):
            return
        if name == "ResizeKeepRatio" and not (step.random_scale_prob or step.random_aspect_prob):
            return
        if name == "CenterCropOrPad" and step.fill in (0, None):
            return
        raise ConfigError(f"{KEY}: the image transform step {step!r} has no device version "
                          f"(supported: RandomResizedCrop, Resize, ResizeKeepRatio, CenterCrop(OrPad), "
                          f"RandomHorizontalFlip); set {KEY}: worker")

    def __call__(self, image: Any) -> Dict[str, torch.Tensor]:
        from torchvision import transforms as T

        encoded = image if isinstance(image, CheckedJpeg) else None
        if encoded is not None:
            image = encoded.header  # size and mode only: the draws below never read pixels
        elif image.mode != "RGB":
            image = image.convert("RGB")
        height, width = image.height, image.width
        box, resize, window, flip, filter_ = (0, 0, height, width), (height, width), (0, 0), False, 1
        current = (height, width)  # of the image the next step sees
        for step in self.steps:
            name = type(step).__name__
            if isinstance(step, T.RandomHorizontalFlip):
                flip = bool(torch.rand(1) < step.p)  # what its forward draws, in the same order
                continue
            if isinstance(step, T.RandomResizedCrop):
                box = tuple(T.RandomResizedCrop.get_params(image, step.scale, step.ratio))
                resize = current = _pair(step.size)
                filter_ = _filter(step.interpolation)
            elif isinstance(step, T.Resize):
                size = [step.size] if isinstance(step.size, int) else list(step.size)
                resize = current = shorter_side_size(height, width, size, step.max_size)
                filter_ = _filter(step.interpolation)
            elif name == "ResizeKeepRatio":
                resize = current = tuple(step.get_params(image, step.size, step.longest))
                filter_ = _filter(step.interpolation)
            else:  # CenterCrop / CenterCropOrPad
                crop = _pair(step.size)
                window = centre_window(current[0], current[1], crop)
                current = crop
        if encoded is not None:
            stored = {"jpeg": torch.frombuffer(bytearray(encoded.data), dtype=torch.uint8)}  # (n,)
        else:
            stored = {"pixels": rgb_pixels(image)}
        return {
            **stored,
            "size": torch.tensor([height, width]),
            "box": torch.tensor(box),
            "resize": torch.tensor(resize),
            "window": torch.tensor(window),
            "flip": torch.tensor(flip),
            "filter": torch.tensor(filter_),
        }


# CUDA's antialiased interpolate holds a pass's filter weights in shared memory, which runs out
# past about a 90x shrink (bicubic; 184x bilinear): "Too much shared memory required". Further
# than this, the axis is first averaged over runs of whole pixels (the CPU kernel has no limit).
CUDA_MAX_SHRINK = 64


def box_shrink(image: torch.Tensor, axis: int, target: int, max_shrink: float) -> torch.Tensor:
    """(1, C, h, w) -> the same with ``axis`` (-1 or -2) averaged over runs of k pixels, k the
    smallest integer that leaves a resize to ``target`` of at most ``max_shrink``; pixels past
    the last whole run are left out. Unchanged where the shrink is already small enough."""
    k = math.ceil(image.shape[axis] / (max_shrink * target))
    if k <= 1:
        return image
    kernel = (1, k) if axis == -1 else (k, 1)
    return F.avg_pool2d(image, kernel, stride=kernel)


def pil_like_resize(image: torch.Tensor, size: Size, filter_: int, max_shrink: Optional[float] = None) -> torch.Tensor:
    """(1, C, h, w) float pixel levels -> (1, C, *size), as PIL resizes: width first, then height,
    each pass clamped to [0, 255]; an axis whose length does not change is left alone.
    ``max_shrink`` (default: ``CUDA_MAX_SHRINK`` on CUDA, none elsewhere): a pass that shrinks
    more is averaged down first (``box_shrink``)."""
    mode = FILTERS[filter_]
    max_shrink = (CUDA_MAX_SHRINK if image.is_cuda else None) if max_shrink is None else max_shrink
    if image.shape[-1] != size[1]:
        if max_shrink is not None:
            image = box_shrink(image, -1, size[1], max_shrink)
        image = F.interpolate(image, size=(image.shape[-2], size[1]), mode=mode, antialias=True,
                              align_corners=False).clamp_(0, 255)
    if image.shape[-2] != size[0]:
        if max_shrink is not None:
            image = box_shrink(image, -2, size[0], max_shrink)
        image = F.interpolate(image, size=size, mode=mode, antialias=True, align_corners=False).clamp_(0, 255)
    return image


@torch.compiler.disable  # traced, the native decoder runs on tensors without data (a segfault)
def decode_jpegs(files: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    """(n_i,) uint8 JPEG files on the host -> (3, h_i, w_i) uint8 RGB on ``device``, in one
    batched ``decode_jpeg`` call (nvJPEG on CUDA; libjpeg, one by one, on the CPU).

    The readers checked every file with libjpeg (``check_jpeg``). nvJPEG may still refuse one (a
    damaged stream that libjpeg reads with a warning, a JPEG feature it lacks), and one refusal
    fails the whole batched call (decode_jpeg returns no partial results). Then the files are
    decoded one by one, and each one the device decoder refuses is decoded on the host as the
    worker path would (PIL) and copied over: one odd file never stops a run.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (a
    # DeprecationWarning); decode_jpeg is still the one that batches nvJPEG on CUDA.
    if device.type == "cuda":
        # nvJPEG writes its outputs from a stream of its own that does not wait for ours, into
        # memory the caching allocator may just have taken back from kernels still queued on ours
        # (pytorch/vision#9606: corrupted batches on H100). Let those kernels finish first.
        torch.cuda.current_stream(device).synchronize()
    try:
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    images = []
    for data in files:
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as error:
            log.warning("decode_jpeg on %s refused a %d-byte JPEG that libjpeg read (%s); decoded with PIL instead",
                        device, data.numel(), str(error).splitlines()[-1][:200])
            images.append(_pil_rgb(data).to(device))
    return images


def rgb_pixels(image: Any) -> torch.Tensor:
    """PIL image -> (3, H, W) uint8 tensor of its RGB pixels, not normalised."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _pil_rgb(data: torch.Tensor) -> torch.Tensor:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        return rgb_pixels(image)


def stored_images(batch: Dict[str, Any], device: torch.device) -> List[torch.Tensor]:
    """A collated ``ImageGeometry`` batch (align/data/sample.py ``collate_images``) -> one
    (3, h, w) uint8 tensor a row on ``device``: its JPEG decoded, or its row of the padded pixels
    (padding included: the crop box never reaches it)."""
    encoded = batch.get("jpeg")
    pixels = list(batch["pixels"].unbind(0)) if "pixels" in batch else []
    if encoded is None:
        return pixels
    decoded = iter(decode_jpegs(encoded.files(), device))
    shipped = iter(pixels)
    return [next(decoded) if length else next(shipped) for length in encoded.lengths.tolist()]


def resized_crops(images: Sequence[torch.Tensor], geometry: Dict[str, torch.Tensor], size: Union[int, Sequence[int]],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One (3, h_i, w_i) uint8 image a row (``stored_images``) + the batch's drawn geometry
    (``ImageGeometry``'s (B, k) tensors) -> (B, 3, *size) float pixel levels in [0, 255] (not
    normalised), on the images' device.

    One resize per image (the images differ in box and scale); the geometry is read to the host
    in one transfer.
    """
    out_h, out_w = _pair(size)
    rows = torch.cat([geometry["box"], geometry["resize"], geometry["window"], geometry["flip"][:, None].long(),
                      geometry["filter"][:, None].long()], dim=1).tolist()  # (B, 10)
    out = images[0].new_zeros((len(images), images[0].shape[0], out_h, out_w), dtype=dtype)  # fill 0 = pad
    for index, (pixels, (top, left, height, width, rh, rw, wt, wl, flip, filter_)) in enumerate(zip(images, rows)):
        crop = pixels[None, :, top:top + height, left:left + width].to(dtype)  # (1, 3, h, w)
        image = pil_like_resize(crop, (rh, rw), filter_)[0]  # (3, rh, rw)
        # the window [wt, wt + out_h) x [wl, wl + out_w) of the resized image; outside it: fill
        src_t, src_l = max(wt, 0), max(wl, 0)
        src_b, src_r = min(wt + out_h, rh), min(wl + out_w, rw)
        out[index, :, src_t - wt:src_b - wt, src_l - wl:src_r - wl] = image[:, src_t:src_b, src_l:src_r]
        if flip:
            out[index] = out[index].flip(-1)
    return out
