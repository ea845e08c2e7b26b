"""Batches reach the device one step ahead (align/train/prefetch.py) and are the loader's batches,
in order, whatever the device; on CUDA the copies run on a side stream (a GPU test)."""
import pytest
import torch

from align.train.prefetch import prefetch_to_device


def batches(n, pin=False):
    generator = torch.Generator().manual_seed(0)
    for k in range(n):
        image = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8, generator=generator)
        yield {"ids": [f"s{k}"], "inputs": {"image": image.pin_memory() if pin else image},
               "masks": {"image": torch.ones(2, dtype=torch.bool)}}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_prefetched_batches_are_the_loaders_in_order(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    expected = list(batches(5))
    got = list(prefetch_to_device(batches(5, pin=device == "cuda"), torch.device(device)))
    assert [b["ids"] for b in got] == [b["ids"] for b in expected]
    for a, b in zip(got, expected):
        assert a["inputs"]["image"].device.type == device
        assert torch.equal(a["inputs"]["image"].cpu(), b["inputs"]["image"])
        assert torch.equal(a["masks"]["image"].cpu(), b["masks"]["image"])


def test_an_empty_loader_yields_nothing():
    assert list(prefetch_to_device(iter([]), torch.device("cpu"))) == []
