"""Which parameters AdamW decays, for every registered tower: matrices of linear and conv layers
are; positional, class and token embeddings, norms, biases and the temperature are not
(CLIP, timm), whatever a tower's author named them."""
import re

import pytest
from torch import nn

from align.config import OptimConfig
from align.registry import TOWERS
from align.train.optim import param_groups
from tests.test_audio import make_tower
from tests.test_towers import tiny_tower_config

BLOCK = re.compile(r"(^|\.)(blocks|resblocks|layers?)\.\d+\.")  # the repeated trunk blocks
# Independent of the optimiser's rules: what an embedding is called in the towers we ship.
EMBEDDING = re.compile(r"(^|\.)(position\w*|positional_embedding|class_embedding|cls_\w+|distillation_token"
                       r"|\w*token_embedding|word_embeddings|token_type_embeddings)(\.weight)?$")

# Decayed parameters outside the repeated blocks: projections, patch and conv stems.
DECAYED_OUTSIDE_BLOCKS = {
    "audio_transformer": ["patch_embed.weight", "projection.weight"],
    "hf_audio": ["projection.weight", "trunk.embeddings.patch_embeddings.projection.weight"],
    "hf_text": ["projection.weight", "trunk.pooler.dense.weight"],
    "open_clip_image": ["projection.weight", "trunk.conv1.weight", "trunk.proj"],
    "open_clip_text": ["projection.weight", "trunk.text_projection"],
}


def build(name, tmp_path):
    if name == "hf_audio":
        return make_tower(name, tmp_path)
    return TOWERS.get(name)(tiny_tower_config(name), 24)


def decayed(module, **optim):
    groups = param_groups(module, OptimConfig(weight_decay=0.1, **optim), {})
    return {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}


@pytest.mark.parametrize("name", TOWERS.names())
def test_only_weight_matrices_are_decayed(name, tmp_path):
    tower = build(name, tmp_path)
    parameters = dict(tower.named_parameters())
    decay = decayed(tower)
    assert sorted(n for n in decay if not BLOCK.search(n)) == DECAYED_OUTSIDE_BLOCKS[name]
    embeddings = [n for n, p in parameters.items() if EMBEDDING.search(n) and p.ndim >= 2]
    assert embeddings, "every tower has a positional or token table"
    assert not decay & set(embeddings)
    for parameter_name in decay:
        owner = tower.get_submodule(parameter_name.rpartition(".")[0])
        assert parameters[parameter_name].ndim >= 2, parameter_name
        assert not isinstance(owner, (nn.LayerNorm, nn.GroupNorm, nn.Embedding)), parameter_name


def test_decay_embeddings_follows_open_clips_trainer(tmp_path):
    """open_clip decays positional, token and class embeddings; norms and biases still not."""
    tower = build("open_clip_text", tmp_path)
    decay = decayed(tower, decay_embeddings=True)
    assert {"trunk.positional_embedding", "trunk.token_embedding.weight"} <= decay
    assert not any(n.endswith("bias") or "ln_" in n for n in decay)
    audio = build("audio_transformer", tmp_path)
    assert "position" in decayed(audio, decay_embeddings=True) and "position" not in decayed(audio)
