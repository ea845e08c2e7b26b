"""A flag value no run can use is a config error (exit 2) naming the flag, before any work: not a
traceback, not an exit 1 after the whole job, and not a run that trains NaNs and exits 0. The
paths below need not exist: each value is refused before anything is read."""
import pytest

from align.cli import main as align

pytestmark = pytest.mark.once  # argument checks: no float computed


def cases(tmp_path):
    folder = str(tmp_path)
    rec_keys = ["data.interactions=log.csv", "data.catalogue=[shop.csv]", "data.items=items"]
    return [
        (["prep", "demo", "--out", folder, "--n-train", "-5"], "--n-train -5"),
        (["prep", "demo", "--out", folder, "--image-size", "0"], "--image-size 0"),
        (["prep", "demo", "--out", folder, "--clip-seconds", "nan"], "--clip-seconds nan"),
        (["rec-train", *rec_keys, "train.lr=.inf"], "train.lr"),
        (["rec-train", *rec_keys, "train.lr=.nan"], "train.lr"),
        (["rec-train", *rec_keys, "train.weight_decay=-1"], "train.weight_decay"),
        (["rec-update", "--checkpoint", folder, "--events", "new.csv", "--lr", "inf"], "--lr inf"),
        (["rec-eval", "--checkpoint", folder, "--output", folder], "is a folder"),
        (["eval", "--checkpoint", folder, "--output", folder], "is a folder"),
        (["map", "--embeddings", folder, "--out", folder, "--thumbnails-mb", "nan"], "--thumbnails-mb"),
        (["export", "--checkpoint", folder, "--out", str(tmp_path / "x"), "--tolerance", "nan"], "--tolerance nan"),
        (["recommend", "--checkpoint", folder, "--history", "a", "-k", "0"], "-k 0"),
        (["recommend", "--checkpoint", folder, "--history", "a", "--loo-max", "-1"], "--loo-max -1"),
        (["prep", "mine-negatives", "--checkpoint", folder, "--manifest", "shop.csv", "--out", "mined.jsonl"],
         "--out mined.jsonl"),
    ]


def test_a_flag_value_no_run_can_use_is_refused_naming_it(tmp_path, capsys):
    for argv, named in cases(tmp_path):
        assert align(argv) == 2, argv
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, (argv, err)
