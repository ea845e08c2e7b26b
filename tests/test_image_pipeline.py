"""``data.image_pipeline: device``: the workers decode and draw the crop, the tower crops, resizes,
flips and normalises the whole batch on its device. Run here on CPU tensors, the device path must
give the worker path's pixels (open_clip's PIL transform) up to interpolation rounding, with the
same crop box and flip for the same per-sample seed.

The bound, in pixel levels (0..255), for images whose values stay in [32, 223]:
PIL resizes in two separable passes and rounds to uint8 after each (its fixed-point weights,
22 fraction bits, add < 1e-3 level); torch keeps float32. With the same filter (PIL's bicubic,
a = -0.5, and triangle, widened by the scale when shrinking = torch's ``antialias=True``
kernel), the first pass's rounding error (<= 0.5) goes through the second pass, whose weights
sum to 1 with absolute sum <= 1.25 (bicubic a = -0.5 at offset 1/2: 2 x 0.5625 + 2 x 0.0625),
then the result is rounded once more (<= 0.5): |diff| <= 0.5 x 1.25 + 0.5 = 1.125 levels, and
the mean |diff| about 0.3 (two independent uniform rounding errors). Keeping the values in
[32, 223] keeps every intermediate inside [0, 255] (the overshoot of a pass is at most 1/8 of
the range for a = -0.5), so neither side clips and the order of the passes does not matter.
On full-range noise, PIL's clipping of its intermediate (whose pass order it picks itself) can
differ from ours near edges that overshoot; that case is checked with a looser bound.
"""
from typing import List

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from align.config import load_config
from align.data.manifest import seeded_sample
from align.data.sample import collate
from align.data.transforms import SampleProcessor, with_image_pipeline
from align.errors import ConfigError
from align.towers.image_ops import resized_crops, stored_images
from align.towers.open_clip import OpenClipImageTokens, pixel_normalisation
from tests.conftest import TINY_CLIP

SIZE = 24
MAX_LEVELS = 1.125 + 1e-3  # derived in the module docstring
MEAN_LEVELS = 0.5
SHAPES = [(37, 53), (64, 31), (17, 17), (100, 75), (11, 40), (24, 24), (23, 90)]  # odd, non-square, up and down


def images(shapes=SHAPES, low: int = 32, high: int = 224, seed: int = 0) -> List[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(low, high, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def both_paths(transform, pictures, seed: int = 7):
    """(worker uint8 (B, 3, S, S), device float levels (B, 3, S, S), collated device batch)."""
    worker, device = OpenClipImageTokens(transform), OpenClipImageTokens(transform).on_device()
    ours, samples = [], []
    for index, picture in enumerate(pictures):
        with seeded_sample((seed, 0, index), None):
            ours.append(worker(picture))
        with seeded_sample((seed, 0, index), None):
            samples.append({"id": str(index), "image": device(picture)})
    batch = collate(samples)["inputs"]["image"]
    return torch.stack(ours), resized_crops(stored_images(batch, torch.device("cpu")), batch, SIZE), batch


def assert_close_levels(worker: torch.Tensor, device: torch.Tensor, max_levels=MAX_LEVELS, mean_levels=MEAN_LEVELS):
    diff = (device - worker.float()).abs()
    assert diff.max().item() <= max_levels and diff.mean().item() <= mean_levels, (diff.max(), diff.mean())


def test_collate_pads_a_batch_of_mixed_sizes():
    transform = open_clip.image_transform(SIZE, is_train=True)
    _, _, batch = both_paths(transform, images())
    assert batch["pixels"].shape == (len(SHAPES), 3, 100, 90) and batch["pixels"].dtype == torch.uint8
    assert batch["size"].tolist() == [list(s) for s in SHAPES]
    assert batch["box"].shape == (len(SHAPES), 4)
    height, width = SHAPES[0]
    assert batch["pixels"][0, :, height:].eq(0).all() and batch["pixels"][0, :, :, width:].eq(0).all()


class _Batches(torch.utils.data.Dataset):
    """Each item is a whole collated batch, built in the worker as the loaders build theirs."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return collate(self.samples[index:])


def test_a_batch_collated_in_a_worker_is_built_in_shared_memory_and_equal():
    padded = both_paths(open_clip.image_transform(SIZE, is_train=True), images())[2]["pixels"]
    samples = [{"id": str(n), "text": torch.arange(n, n + 5), "image": torch.full((3, 4, 4), float(n))}
               for n in range(3)]
    loader = torch.utils.data.DataLoader(_Batches(samples), batch_size=None, num_workers=1)
    for index, batch in enumerate(loader):  # from the worker: no copy into shared memory on the way
        expected = collate(samples[index:])  # here, in the main process
        for name in ("text", "image"):
            assert batch["inputs"][name].is_shared() and not expected["inputs"][name].is_shared()
            assert torch.equal(batch["inputs"][name], expected["inputs"][name])
    assert padded.dtype == torch.uint8 and not padded.is_shared()  # the padding path, main process


def test_train_crops_pick_the_same_box_and_pixels_as_open_clips_transform():
    transform = open_clip.image_transform(SIZE, is_train=True)  # RandomResizedCrop, bicubic
    pictures = images()
    worker, device, batch = both_paths(transform, pictures)
    # The box is the one the worker path drew: PIL's crop + resize of that box gives its pixels exactly.
    for index, picture in enumerate(pictures):
        top, left, height, width = batch["box"][index].tolist()
        again = picture.crop((left, top, left + width, top + height)).resize((SIZE, SIZE), Image.BICUBIC)
        assert torch.equal(torch.from_numpy(np.asarray(again).copy()).permute(2, 0, 1), worker[index])
    assert len({tuple(b) for b in batch["box"].tolist()}) == len(pictures)  # really random crops
    assert_close_levels(worker, device)
    # another seed draws other boxes: the comparison above would see a wrong box
    _, _, other = both_paths(transform, pictures, seed=8)
    assert not torch.equal(other["box"], batch["box"])


def test_a_flip_is_drawn_after_the_crop_as_the_transform_draws_it():
    base = open_clip.image_transform(SIZE, is_train=True)
    steps = list(base.transforms)
    transform = T.Compose([steps[0], T.RandomHorizontalFlip(0.5), *steps[1:]])
    worker, device, batch = both_paths(transform, images() * 2)
    assert 0 < int(batch["flip"].sum()) < len(batch["flip"])  # both outcomes occur
    assert_close_levels(worker, device)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_resize_and_centre_crop_match(resize_mode, interpolation):
    transform = open_clip.image_transform(SIZE, is_train=False, resize_mode=resize_mode, interpolation=interpolation)
    worker, device, batch = both_paths(transform, images())
    assert batch["box"][:, :2].eq(0).all()  # eval: the whole image
    assert_close_levels(worker, device)


def test_full_range_noise_stays_close():
    """Worst case for clipping: uniform noise over 0..255 (see the module docstring)."""
    pictures = images(low=0, high=256)
    for train in (True, False):
        worker, device, _ = both_paths(open_clip.image_transform(SIZE, is_train=train), pictures)
        assert_close_levels(worker, device, max_levels=32, mean_levels=0.6)


def test_a_shrink_past_cudas_limit_is_averaged_down_first():
    """CUDA's antialiased resize refuses a pass that shrinks past ~90x (its filter weights outgrow
    shared memory): such an axis is first averaged over runs of whole pixels (``box_shrink``),
    exactly a mean, to within the limit; below the limit nothing changes, bit for bit."""
    from align.towers.image_ops import CUDA_MAX_SHRINK, box_shrink, pil_like_resize

    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 70, 6400), generator=generator).float()  # 6400 -> 64 wide: 100x
    shrunk = box_shrink(image, -1, 64, CUDA_MAX_SHRINK)
    k = 2  # the smallest whole run that leaves at most 64x: 6400 / 2 / 64 = 50
    assert shrunk.shape == (1, 3, 70, 3200) and 6400 / k / 64 <= CUDA_MAX_SHRINK
    expected = image.double().reshape(1, 3, 70, 3200, k).mean(-1)
    assert (shrunk.double() - expected).abs().max() <= 255 * k * 2.0 ** -24  # a float32 sum of k levels, divided
    tall = box_shrink(image.transpose(-1, -2), -2, 64, 10)  # 6400 / 64 / 10: runs of 10
    assert tall.shape == (1, 3, 640, 70)
    assert torch.equal(box_shrink(image, -1, 64, 101), image)  # 100x is within a limit of 101
    assert torch.equal(pil_like_resize(image, (64, 64), 1, max_shrink=1000), pil_like_resize(image, (64, 64), 1))
    limited = pil_like_resize(image, (64, 64), 1, max_shrink=CUDA_MAX_SHRINK)  # bicubic
    assert limited.shape == (1, 3, 64, 64) and 0 <= limited.min() and limited.max() <= 255


def test_normalised_batch_equals_open_clips_own_tensors():
    """What the trunk sees: open_clip's full transform (ToTensor + Normalize) per image vs the
    device path's batch normalised with the tower's (scale, shift)."""
    transform = open_clip.image_transform(SIZE, is_train=True)
    pictures = images()
    expected = []
    for index, picture in enumerate(pictures):
        with seeded_sample((7, 0, index), None):
            expected.append(transform(picture))
    _, device, _ = both_paths(transform, pictures)
    scale, shift = pixel_normalisation(transform)
    ours = torch.addcmul(shift, device, scale)
    bound = MAX_LEVELS * scale.max().item()  # levels -> normalised units
    assert (ours - torch.stack(expected)).abs().max().item() <= bound


def test_transforms_that_cannot_move_are_refused_naming_the_key():
    jitter = T.Compose([T.RandomResizedCrop(SIZE), T.ColorJitter(0.4), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    with pytest.raises(ConfigError, match="data.image_pipeline"):
        OpenClipImageTokens(jitter).on_device()
    flip_first = T.Compose([T.RandomHorizontalFlip(), T.RandomResizedCrop(SIZE), T.ToTensor(),
                            T.Normalize([0.5] * 3, [0.5] * 3)])
    with pytest.raises(ConfigError, match="data.image_pipeline"):  # refused when built, not per sample
        OpenClipImageTokens(flip_first).on_device()
    processor = SampleProcessor({"image": lambda image: image})  # no on_device: a tower of another kind
    with pytest.raises(ConfigError, match="data.image_pipeline"):
        with_image_pipeline(processor, "device")
    assert with_image_pipeline(processor, "worker") is processor


def test_config_key_is_strict():
    tower = ["model.towers.image.type=open_clip_image", f"model.towers.image.model={TINY_CLIP}"]
    assert load_config(None, tower + ["data.image_pipeline=device"]).data.image_pipeline == "device"
    assert load_config(None, tower).data.image_pipeline == "worker"
    with pytest.raises(ConfigError, match="image_pipeline"):
        load_config(None, tower + ["data.image_pipeline=gpu"])


def test_training_on_the_device_pipeline_starts_from_the_same_loss(tmp_path):
    """Two steps of ``align train`` with each pipeline: the first loss (same weights, same
    samples, same crops) differs only by the pixel rounding above, a fraction of a level."""
    from align.data.demo_catalogue import build_demo_catalogue
    from align.train.recipe import train
    from tests.test_train_e2e import tiny_overrides

    demo = tmp_path / "demo"
    build_demo_catalogue(str(demo), seed=0, n_train=64, n_test=16, image_size=32, clip_seconds=0.5)
    first = {}
    for pipeline in ("worker", "device"):
        config = load_config(None, tiny_overrides(demo, tmp_path / pipeline, "train.max_steps=2", "data.batch_size=16",
                                                  f"data.image_pipeline={pipeline}"))
        history = train(config)["history"]
        assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
        first[pipeline] = history[0]["loss"]
    # measured: 9.70307 vs 9.70279 (3e-5 relative); equal bits would mean the device path never ran
    assert first["device"] != first["worker"]
    assert abs(first["device"] - first["worker"]) <= 1e-3 * first["worker"], first
