"""Training from webdataset shards made by `align prep shards`, with broken samples in them:
the run finishes, skips exactly the broken samples and reports them by reason; past the
configured bad fraction it stops with an error that names the reason."""
import io
import json
import os
import tarfile

import pytest

from align.config import load_config
from align.train.recipe import train
from data_prep.shards import main as prep_shards
from tests.test_train_e2e import tiny_overrides


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
    from align.data.demo_catalogue import build_demo_catalogue

    root = tmp_path_factory.mktemp("shard-demo")
    demo = root / "demo"
    build_demo_catalogue(str(demo), seed=1, n_train=400, n_test=80, image_size=32, clip_seconds=0.5)
    shards = root / "shards"
    assert prep_shards([str(demo / "train.csv"), "--out", str(shards), "--samples-per-shard", "64",
                        "--image-max-side", "32", "--image-format", "png", "--clip-seconds", "0.5",
                        "--workers", "1", "--col-text", "title"]) == 0
    names = sorted(n for n in os.listdir(shards) if n.endswith(".tar"))
    contents = {}
    for name in names:
        with tarfile.open(shards / name) as tar:
            contents[name] = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members_of = {}
    for name, members in contents.items():
        for member, _ in members:
            key, ext = member.name.split(".", 1)
            members_of.setdefault(key, set()).add(ext)
    # Break 8 images, 8 audio clips and 4 texts (20 of 400 samples = 5%), each in its own sample.
    broken = {}
    for ext, count in (("png", 8), ("flac", 8), ("json", 4)):
        for key in sorted(k for k, exts in members_of.items() if ext in exts and "txt" in exts and k not in broken)[:count]:
            broken[key] = ext
    expected = {"bad_image": 8, "bad_audio": 8, "empty_text": 4}
    for name, members in contents.items():
        with tarfile.open(shards / name, "w") as tar:
            for member, data in members:
                key, ext = member.name.split(".", 1)
                if broken.get(key) == ext == "json":
                    data = json.dumps({**json.loads(data), "text": ""}).encode()
                elif broken.get(key) == "json" and ext == "txt":
                    data = b""
                elif broken.get(key) == ext:
                    data = data[: len(data) // 3]  # truncated bytes
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    spec = str(shards / ("shards-{000000..%06d}.tar" % (len(names) - 1)))
    return demo, spec, expected


def test_training_skips_and_counts_exactly_the_broken_samples(damaged_shards, tmp_path):
    demo, spec, expected = damaged_shards
    config = load_config(None, tiny_overrides(str(demo), tmp_path / "run", "train.epochs=1", f"data.train={spec}",
                                              "data.batch_size=40", "data.max_bad_fraction=0.1"))
    summary = train(config)
    assert summary["steps"] == 10  # 400 samples / 40: the broken ones leave gaps, not fewer steps
    assert summary["bad_samples"] == expected
    assert json.load(open(tmp_path / "run" / "summary.json"))["bad_samples"] == expected


def test_too_many_bad_samples_stop_with_an_error_naming_the_reason(damaged_shards, tmp_path):
    demo, spec, _ = damaged_shards
    config = load_config(None, tiny_overrides(str(demo), tmp_path / "run", "train.epochs=1", f"data.train={spec}",
                                              "data.batch_size=40", "data.max_bad_fraction=0.01"))
    with pytest.raises(Exception, match="bad_image|bad_audio|empty_text"):
        train(config)
