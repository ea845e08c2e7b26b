"""data.jpeg_draft: a big JPEG is decoded at a reduced scale no smaller than the transform's crop
needs, in manifest and shard readers alike; the pixels the model sees stay close to a full decode;
PNGs and small JPEGs are decoded whole; a transform without a size is refused naming the key."""
import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from align.data.manifest import open_image
from align.data.transforms import SampleProcessor, draft_side, with_jpeg_draft
from align.errors import ConfigError


def smooth_jpeg(side=1600, quality=92):
    """A smooth photo-like image (gradients and a slow wave) as JPEG bytes, and its pixels."""
    x = np.linspace(0.0, 1.0, side)
    planes = [np.outer(np.sin(6 * x), np.cos(4 * x)), np.outer(x, x), np.outer(1 - x, x ** 2)]
    pixels = (np.stack(planes, -1) * 120 + 128).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_draft_side_leaves_the_crop_twice_the_pixels_it_needs():
    train = open_clip.image_transform(224, is_train=True)  # RandomResizedCrop(224, scale=(0.9, 1.0))
    assert draft_side(train) == int(np.ceil(2 * 224 / np.sqrt(0.9)))
    assert draft_side(open_clip.image_transform(224, is_train=False)) == 448  # Resize(224) + CenterCrop(224)
    from torchvision import transforms as T

    assert draft_side(T.RandomResizedCrop(64, scale=(0.25, 1.0))) == 256  # a quarter of the area: twice the side
    with pytest.raises(ConfigError, match="data.jpeg_draft"):
        draft_side(T.Compose([T.ToTensor()]))


def test_a_big_jpeg_is_decoded_smaller_and_the_model_sees_nearly_the_same_pixels():
    data = smooth_jpeg()
    transform = open_clip.image_transform(224, is_train=False)
    side = draft_side(transform)
    full, drafted = open_image(data, "a", "here"), open_image(data, "a", "here", side)
    assert full.size == (1600, 1600) and side <= min(drafted.size) < 1600  # 1/2 scale: 800 >= 448
    a, b = transform(full), transform(drafted)
    levels = (a - b).abs() * 255 * 0.27  # normalised -> about pixel levels (open_clip's std is about 0.27)
    assert levels.mean() < 0.5 and levels.max() < 6, (levels.mean(), levels.max())  # measured 0.04, 1.0


def test_png_and_small_jpeg_are_decoded_whole():
    buffer = io.BytesIO()
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(buffer, "PNG")
    assert open_image(buffer.getvalue(), "p", "here", 448).size == (1600, 1200)
    small = smooth_jpeg(side=800)  # below twice the draft side: nothing to gain
    assert open_image(small, "s", "here", 448).size == (800, 800)


def test_the_setting_reaches_manifest_and_shard_readers(tmp_path):
    from align.data.manifest import load_raw
    from align.data.shards import _Item, decode_sample

    transform = open_clip.image_transform(224, is_train=False)
    processor = with_jpeg_draft(SampleProcessor({"image": transform}), True)
    assert processor.image_draft_side == 448
    assert with_jpeg_draft(SampleProcessor({"image": transform}), False).image_draft_side is None
    data = smooth_jpeg()
    (tmp_path / "big.jpg").write_bytes(data)
    row = {"id": "a", "_where": "m.csv:1", "image": "big.jpg", "audio": "", "text": "t", "group": None,
           "negatives": []}
    from_manifest = load_raw(row, tmp_path, ("image",), processor.image_draft_side)["image"]
    from_shard = decode_sample(_Item((0, 0, 0), "a", {"jpg": data}, "s.tar"), ("image",),
                               processor.image_draft_side)["image"]
    assert from_manifest.size == from_shard.size == (800, 800)
    assert torch.equal(processor({"id": "a", "image": from_manifest})["image"],
                       processor({"id": "a", "image": from_shard})["image"])
