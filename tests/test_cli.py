"""The `align` command: a light start, and expected failures that end with a message and an exit
code, not a traceback."""
import csv
import os
import subprocess
import sys

import pytest

from align.cli import main as align_main
from tests.conftest import REPO
from tests.test_train_e2e import tiny_overrides


def _imports_torch(code: str) -> bool:
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print('torch' in sys.modules)"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] == "True"


def test_help_and_prep_help_do_not_import_torch():
    for argv in (["--help"], ["prep", "shards", "--help"], ["train", "--help"]):
        code = (f"from align.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass")
        assert not _imports_torch(code), argv
    assert not _imports_torch("import align; align.ConfigError; align.load_config")


def test_align_alone_lists_every_verb_with_what_it_does(capsys):
    from align.cli import TOOL_VERBS

    assert align_main([]) == 2
    words = " ".join(capsys.readouterr().err.split())  # the help wraps where the terminal ends
    for verb, (_, does) in {**TOOL_VERBS, "train": (None, "train a model"), "prep": (None, "make training data")}.items():
        assert f" {verb} {' '.join(does.split())}" in words, (verb, words)


def test_info_logging_stays_on(monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # let basicConfig act in this process
    with pytest.raises(SystemExit):
        align_main(["--help"])
    assert logging.getLogger().getEffectiveLevel() == logging.INFO
    assert logging.getLogger("align.train").isEnabledFor(logging.INFO)


def test_too_many_bad_samples_end_with_the_message_alone(small_demo, tmp_path, capsys):
    with open(os.path.join(small_demo, "train.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    broken = [r for r in rows if r["image"]][:100]
    for row in broken:  # unreadable PNGs: the run must stop once more than 5% are bad
        with open(os.path.join(small_demo, row["image"]), "wb") as image:
            image.write(b"not a png")
    code = align_main(["train", *tiny_overrides(small_demo, tmp_path / "run", "train.epochs=1")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert "max_bad_fraction" in err and "bad_image" in err
    assert any(row["id"] in err for row in broken)  # names the samples and their files


def test_eval_of_an_empty_split_is_refused_with_its_name(small_demo, tmp_path, capsys):
    assert align_main(["train", *tiny_overrides(small_demo, tmp_path / "run", "train.max_steps=1",
                                                "data.max_bad_fraction=1.0")]) == 0
    empty = tmp_path / "empty.csv"
    empty.write_text("id,title,image,audio\n")
    checkpoint = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    capsys.readouterr()
    code = align_main(["eval", "--checkpoint", str(checkpoint), "--split", str(empty)])
    err = capsys.readouterr().err
    assert code == 1
    assert str(empty) in err and "no sample to evaluate" in err
    assert "Traceback" not in err
