"""``data.image_decode: device``: the readers check a JPEG with a 1/8-scale decode and ship its bytes,
the image tower decodes the batch's JPEGs on its device (here the CPU: torchvision's libjpeg
``decode_jpeg``, the same code path as nvJPEG on CUDA) and crops them as the pixel path does.

The bound: PIL and torchvision's CPU ``decode_jpeg`` are both libjpeg-turbo (3.x here), both with
its defaults, the accurate integer IDCT (islow) and fancy (triangle) chroma upsampling, whose
SIMD and C versions give the same integers; the two decoders give the same pixels (measured:
max 0 levels on every JPEG below: colour 4:2:0, 4:2:2, 4:4:4, greyscale, progressive, odd sizes).
``DECODE_LEVELS = 1`` allows one level for a build whose colour conversion rounds otherwise. A
crop then moves a decoder difference of d levels at most 1.25 d (the resize weights' absolute sum
<= 1.25 per pass, tests/test_image_pipeline.py), so the model inputs of the two paths differ by
at most ``1.25^2 * DECODE_LEVELS`` levels plus float32 rounding. nvJPEG on a GPU has its own IDCT
and upsampling and may differ by a few levels more; that is not checked here.
"""
import io
import json
import os
import tarfile
from typing import Dict, List

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from align.config import load_config
from align.data.loader import build_loader
from align.data.manifest import open_image, seeded_sample
from align.data.sample import CheckedJpeg, JpegBytes, collate
from align.data.transforms import SampleProcessor, with_image_decode, with_image_pipeline, with_jpeg_draft
from align.errors import ConfigError
from align.towers.image_ops import decode_jpegs, resized_crops, stored_images
from align.towers.open_clip import OpenClipImageTokens
from tests.conftest import TINY_CLIP

SIZE = 24
DECODE_LEVELS = 1  # module docstring
CROP_LEVELS = 1.25 * 1.25 * DECODE_LEVELS + 1e-3
CPU = torch.device("cpu")


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Photo-like RGB: smooth colour waves + sensor-like noise (the noise keeps chroma busy)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    waves = np.stack([np.sin(9 * x + 3 * y), np.cos(35 * x * y), np.sin(13 * (x - y))], -1) * 90 + 128
    return (waves + np.random.default_rng(seed).normal(0, 10, waves.shape)).clip(0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


# name -> JPEG bytes: PIL's subsampling 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0
JPEGS: Dict[str, bytes] = {
    "420 37x53": encode(photo(37, 53, 1), quality=90, subsampling=2),
    "444 64x31": encode(photo(64, 31, 2), quality=95, subsampling=0),
    "422 101x75": encode(photo(101, 75, 3), quality=85, subsampling=1),
    "420 17x17": encode(photo(17, 17, 4), quality=75, subsampling=2),
    "420 odd 45x123": encode(photo(45, 123, 5), quality=90, subsampling=2),
    "grey 33x70": encode(photo(33, 70, 6)[..., 0], quality=90),
    "progressive 80x61": encode(photo(80, 61, 7), quality=90, progressive=True),
}


def pil_rgb(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def test_torchvisions_cpu_decoder_gives_pils_pixels():
    files = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in JPEGS.values()]
    for name, data, decoded in zip(JPEGS, JPEGS.values(), decode_jpegs(files, CPU)):
        expected = pil_rgb(data)
        assert decoded.shape == expected.shape and decoded.dtype == torch.uint8, name
        diff = (decoded.int() - expected.int()).abs()
        assert diff.max().item() <= DECODE_LEVELS, (name, diff.max().item(), diff.float().mean().item())


def batches(transform, sources: List[bytes], seed: int = 7):
    """The same encoded files through the device pipeline decoded in the workers (``worker``) and
    on the tower's device (``device``): {name: collated image batch}."""
    geometry = OpenClipImageTokens(transform).on_device()
    out = {}
    for decode, keep in (("worker", False), ("device", True)):
        samples = []
        for index, data in enumerate(sources):
            with seeded_sample((seed, 0, index), None):
                samples.append({"id": str(index), "image": geometry(open_image(data, str(index), "here", keep_jpeg=keep))})
        out[decode] = collate(samples)["inputs"]["image"]
    return out


@pytest.mark.parametrize("train", [True, False])
def test_device_decode_gives_the_worker_decodes_model_input(train):
    transform = open_clip.image_transform(SIZE, is_train=train)
    sources = list(JPEGS.values())
    batch = batches(transform, sources)
    worker, device = batch["worker"], batch["device"]
    assert "jpeg" not in worker and worker["pixels"].shape[0] == len(sources)
    assert "pixels" not in device and device["jpeg"].lengths.tolist() == [len(s) for s in sources]
    for key in ("size", "box", "resize", "window", "flip", "filter"):  # the same draws from the header alone
        assert torch.equal(worker[key], device[key]), key
    if train:
        assert len({tuple(b) for b in device["box"].tolist()}) == len(sources)  # really random crops
    levels = {name: resized_crops(stored_images(b, CPU), b, SIZE) for name, b in batch.items()}
    diff = (levels["device"] - levels["worker"]).abs()
    assert diff.max().item() <= CROP_LEVELS, diff.max().item()


def test_png_cmyk_and_drafted_jpegs_keep_the_pixel_path_in_the_same_batch():
    png = encode(photo(29, 41, 8), "PNG")
    cmyk_buffer = io.BytesIO()  # a CMYK JPEG: PIL undoes Adobe's inverted CMYK, decode_jpeg's RGB may not
    Image.fromarray(photo(30, 30, 9)).convert("CMYK").save(cmyk_buffer, "JPEG")
    cmyk = cmyk_buffer.getvalue()
    big = encode(photo(400, 300, 10), quality=90)  # min side 300 >= 2 x draft side 100: drafted to 1/2
    sources = [JPEGS["420 37x53"], png, cmyk, big, JPEGS["grey 33x70"]]
    for index, data in enumerate(sources):
        opened = open_image(data, str(index), "here", draft_side=100, keep_jpeg=True)
        assert isinstance(opened, CheckedJpeg) == (index in (0, 4)), index
    transform = open_clip.image_transform(SIZE, is_train=True)
    geometry = OpenClipImageTokens(transform).on_device()
    samples, pictures = [], []
    for index, data in enumerate(sources):
        with seeded_sample((7, 0, index), None):
            samples.append({"id": str(index), "image": geometry(open_image(data, str(index), "", 100, keep_jpeg=True))})
        pictures.append(open_image(data, str(index), "", 100))  # the worker path, draft included
    batch = collate(samples)["inputs"]["image"]
    assert batch["jpeg"].lengths.tolist() == [len(sources[0]), 0, 0, 0, len(sources[4])]
    assert batch["pixels"].shape[0] == 3  # png, cmyk, the drafted JPEG, in row order
    assert batch["size"][3].tolist() == [200, 150]  # the draft's size, as the worker path decodes it
    images = stored_images(batch, CPU)
    for index, picture in enumerate(pictures):  # each row is what the worker path would have decoded
        height, width = batch["size"][index].tolist()
        expected = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
        diff = (images[index][:, :height, :width].int() - expected.int()).abs()
        assert diff.max().item() <= DECODE_LEVELS, index
    assert resized_crops(images, batch, SIZE).shape == (len(sources), 3, SIZE, SIZE)


def test_the_tower_decodes_a_mixed_batch_and_embeds_it_as_the_worker_decode():
    from align.model import build_model

    config = load_config(None, ["model.towers.image.type=open_clip_image", f"model.towers.image.model={TINY_CLIP}",
                                "model.embed_dim=16"])
    torch.manual_seed(0)
    tower = build_model(config.model).towers["image"].eval()  # build_model: open_clip's cache left empty
    transform = tower.transform(train=True)
    sources = [*JPEGS.values(), encode(photo(50, 40, 11), "PNG")]
    batch = batches(transform, sources)
    with torch.no_grad():
        worker, device = tower(batch["worker"]), tower(batch["device"])
    assert worker.shape == device.shape == (len(sources), 16)
    assert torch.allclose(worker, device, atol=1e-4), (worker - device).abs().max()


def test_jpeg_bytes_stay_on_the_host_when_a_batch_moves():
    from align.train.prefetch import to_device

    batch = batches(open_clip.image_transform(SIZE, is_train=True), list(JPEGS.values())[:3])["device"]
    moved = to_device({"inputs": {"image": batch}}, torch.device("meta"))["inputs"]["image"]
    assert moved["box"].device.type == "meta"  # the tensors went
    assert moved["jpeg"] is batch["jpeg"] and moved["jpeg"].data.device == CPU  # the bytes stayed
    assert batch["jpeg"].to(torch.device("meta"), non_blocking=True) is batch["jpeg"]  # align/encoding.py's move


def test_a_batch_collated_in_a_worker_keeps_its_bytes_in_shared_memory():
    from tests.test_image_pipeline import _Batches

    geometry = OpenClipImageTokens(open_clip.image_transform(SIZE, is_train=True)).on_device()
    samples = [{"id": str(n), "image": geometry(open_image(data, str(n), "", keep_jpeg=True))}
               for n, data in enumerate(JPEGS.values())]
    expected = collate(samples)["inputs"]["image"]["jpeg"]
    loader = torch.utils.data.DataLoader(_Batches(samples), batch_size=None, num_workers=1)
    got = next(iter(loader))["inputs"]["image"]["jpeg"]  # the first batch: every sample
    assert isinstance(got, JpegBytes) and got.data.is_shared()  # from the worker without a copy
    assert torch.equal(got.data, expected.data) and torch.equal(got.lengths, expected.lengths)
    assert [f.numel() for f in got.files()] == [len(d) for d in JPEGS.values()]


def write_shard(folder, name: str, members: Dict[str, Dict[str, bytes]]) -> None:
    with tarfile.open(os.path.join(folder, name), "w") as tar:
        for key, files in members.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sizes_file = os.path.join(folder, "sizes.json")
    sizes = json.load(open(sizes_file)) if os.path.isfile(sizes_file) else {}
    with open(sizes_file, "w") as handle:
        json.dump({**sizes, name: len(members)}, handle)


def text_length(text: str) -> torch.Tensor:
    return torch.tensor([len(text)])  # a stand-in tokenizer: the text only has to be there


def device_processor(decode: str) -> SampleProcessor:
    transform = open_clip.image_transform(SIZE, is_train=True)
    processor = SampleProcessor({"image": OpenClipImageTokens(transform), "text": text_length})
    return with_image_decode(with_image_pipeline(processor, "device"), decode)


def write_manifest(folder, members: Dict[str, Dict[str, bytes]]) -> str:
    lines = ["id,image,title"]
    for key, files in members.items():
        ext = next(e for e in files if e != "txt")
        (folder / f"{key}.{ext}").write_bytes(files[ext])
        lines.append(f"{key},{key}.{ext},{files['txt'].decode()}")
    (folder / "m.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "m.csv")


@pytest.mark.parametrize("reader", ["shards", "manifest"])
def test_a_broken_jpeg_is_skipped_and_counted_as_with_the_worker_decode(tmp_path, reader):
    good = list(JPEGS.values())
    whole = encode(photo(60, 80, 12), quality=90)
    scan = whole.index(b"\xff\xda")
    broken = {"truncated": whole[: len(whole) // 2], "no_header": whole[:scan // 2],
              "huffman_run": whole[:scan + 300] + b"\xff" * 50 + whole[scan + 350:],
              "not_an_image": b"plain text, not a JPEG"}
    members = {f"good{n}": {"jpg": data, "txt": f"good {n}".encode()} for n, data in enumerate(good)}
    members.update({name: {"jpg": data, "txt": name.encode()} for name, data in broken.items()})
    members["png"] = {"png": encode(photo(20, 30, 13), "PNG"), "txt": b"a png"}
    if reader == "shards":
        write_shard(tmp_path, "s-000000.tar", members)
        spec = str(tmp_path / "s-000000.tar")
    else:
        spec = write_manifest(tmp_path, members)
    counts, ids = {}, {}
    for decode in ("worker", "device"):
        loader = build_loader(spec, device_processor(decode), batch_size=len(members), num_workers=0, train=False,
                              seed=0, drop_last=False, max_bad_fraction=1.0)
        (batch,) = list(loader.iterate(0))
        counts[decode], ids[decode] = dict(loader.bad.counts), sorted(batch["ids"])
        image = batch["inputs"]["image"]
        if decode == "device":
            assert (image["jpeg"].lengths > 0).sum().item() == len(good) and image["pixels"].shape[0] == 1
            assert resized_crops(stored_images(image, CPU), image, SIZE).shape == (len(good) + 1, 3, SIZE, SIZE)
    assert counts["device"] == counts["worker"] == {"bad_image": len(broken)}
    assert ids["device"] == ids["worker"] == sorted([*(f"good{n}" for n in range(len(good))), "png"])


def test_a_file_the_device_decoder_refuses_is_decoded_on_the_host(monkeypatch, caplog):
    """nvJPEG refuses some streams libjpeg reads (with a warning); it cannot run here, so its
    refusal of one file is played by a decoder that raises for that file, as decode_jpeg does."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    refused = torch.frombuffer(bytearray(JPEGS["grey 33x70"]), dtype=torch.uint8)

    def strict(data, **kwargs):
        if any(d.numel() == refused.numel() for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("Error while decoding JPEG images: nvjpegDecode failed")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", strict)
    files = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in JPEGS.values()]
    decoded = decode_jpegs(files, CPU)
    for data, image in zip(JPEGS.values(), decoded):
        assert torch.equal(image, pil_rgb(data))
    assert "refused a" in caplog.text


def test_config_needs_the_device_pipeline_and_refuses_other_values():
    tower = ["model.towers.image.type=open_clip_image", f"model.towers.image.model={TINY_CLIP}"]
    both = load_config(None, tower + ["data.image_pipeline=device", "data.image_decode=device"])
    assert both.data.image_decode == "device" and load_config(None, tower).data.image_decode == "worker"
    with pytest.raises(ConfigError, match="data.image_decode"):
        load_config(None, tower + ["data.image_decode=device"])  # the worker pipeline: refused at load
    with pytest.raises(ConfigError, match="image_decode"):
        load_config(None, tower + ["data.image_pipeline=device", "data.image_decode=gpu"])
    plain = SampleProcessor({"image": OpenClipImageTokens(open_clip.image_transform(SIZE, is_train=True))})
    with pytest.raises(ConfigError, match="data.image_decode"):  # the processor, built without the config check
        with_image_decode(plain, "device")
    assert with_image_decode(plain, "worker") is plain
    drafted = with_image_decode(with_image_pipeline(with_jpeg_draft(plain, True), "device"), "device")
    assert drafted.image_keep_jpeg and drafted.image_draft_side == draft_side_of(plain)


def draft_side_of(processor: SampleProcessor) -> int:
    from align.data.transforms import draft_side

    return draft_side(processor.preprocessors["image"])


def test_a_training_step_from_jpeg_shards_decodes_on_the_device(tmp_path):
    """``align train`` with both keys from webdataset shards of JPEGs: batches carry bytes, the
    steps run and so does the final evaluation, which embeds the same shards through
    align/encoding.py (its own move to the device). Loss and retrieval figures are the worker
    decode's: the decoders agree (test above)."""
    from align.data.demo_catalogue import build_demo_catalogue
    from align.data.loader import loader_from_config, worker_processor
    from align.model import build_model
    from align.train.recipe import train
    from data_prep.shards import main as prep_shards
    from tests.test_train_e2e import tiny_overrides

    demo, shards = tmp_path / "demo", tmp_path / "shards"
    build_demo_catalogue(str(demo), seed=0, n_train=48, n_test=8, image_size=40, clip_seconds=0.5)
    assert prep_shards([str(demo / "train.csv"), "--out", str(shards), "--samples-per-shard", "24",
                        "--image-format", "jpg", "--image-max-side", "40", "--workers", "1", "--col-text", "title",
                        "--clip-seconds", "0.5"]) == 0
    spec = str(shards / "shards-{000000..000001}.tar")
    losses, evaluations = {}, {}
    # compiled: the decoder stays out of the traced graph (tracing it ran the native decoder on
    # tensors without data: a segfault); aot_eager traces as inductor would, without kernels
    compiled = ("train.compile=true", "train.compile_backend=aot_eager")
    for decode in ("worker", "device", "device+compile"):
        overrides = tiny_overrides(demo, tmp_path / decode, "train.max_steps=2", "data.batch_size=16",
                                   f"data.train={spec}", f"data.val={spec}", "data.num_workers=1",
                                   "data.image_pipeline=device", f"data.image_decode={decode.split('+')[0]}",
                                   *(compiled if decode.endswith("compile") else ()))
        config = load_config(None, overrides)
        if decode == "device":
            processor = SampleProcessor(build_model(config.model).preprocessors(train=True))
            assert worker_processor(processor, config.data).image_keep_jpeg
            batch = next(iter(loader_from_config(config, processor).iterate(0)))
            assert (batch["inputs"]["image"]["jpeg"].lengths > 0).all()  # every image travelled as bytes
        summary = train(config)
        history = summary["history"]
        assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
        losses[decode], evaluations[decode] = history[0]["loss"], summary["eval"]["text->image"]
    for decode in ("device", "device+compile"):
        assert abs(losses[decode] - losses["worker"]) <= 1e-4 * losses["worker"], losses
        assert "R@1" in evaluations[decode] and evaluations[decode] == pytest.approx(evaluations["worker"], abs=1e-6)


def test_a_cached_step_decodes_each_jpeg_once_and_trains_as_the_worker_decode(tmp_path, monkeypatch):
    """``train.accum_steps`` > 1 embeds each micro-batch twice (align/train/cached_step.py); the
    micro-batches are made ``reusable`` first, so each JPEG is decoded once a step, not twice, and
    the loss is the worker decode's."""
    from align.data.demo_catalogue import build_demo_catalogue
    from align.towers import image_ops
    from align.train.recipe import train
    from data_prep.shards import main as prep_shards
    from tests.test_train_e2e import tiny_overrides

    demo, shards = tmp_path / "demo", tmp_path / "shards"
    build_demo_catalogue(str(demo), seed=0, n_train=32, n_test=8, image_size=40, clip_seconds=0.5)
    assert prep_shards([str(demo / "train.csv"), "--out", str(shards), "--samples-per-shard", "16",
                        "--image-format", "jpg", "--image-max-side", "40", "--workers", "1", "--col-text", "title",
                        "--clip-seconds", "0.5"]) == 0
    decoded = []
    real = image_ops.decode_jpegs

    def counting(files, device):
        decoded.append(len(files))
        return real(files, device)

    monkeypatch.setattr(image_ops, "decode_jpegs", counting)
    losses = {}
    for decode in ("worker", "device"):
        overrides = tiny_overrides(demo, tmp_path / decode, "train.max_steps=2", "train.accum_steps=2",
                                   "data.batch_size=8", f"data.train={shards}/shards-{{000000..000001}}.tar",
                                   "data.num_workers=1", "data.image_pipeline=device", f"data.image_decode={decode}")
        history = train(load_config(None, overrides))["history"]  # held-out split: the PNG manifest
        assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
        losses[decode] = [h["loss"] for h in history]
    # one decode a micro-batch a step (two without ``reusable``), of its rows with a photo
    assert len(decoded) == 2 * 2 and 0 < sum(decoded) <= 2 * 2 * 8, decoded
    assert losses["device"] == pytest.approx(losses["worker"], rel=1e-4), losses
