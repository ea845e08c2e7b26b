"""Bad input to `align train` and `align prep shards` ends with one line that names the file, row
or flag, and an exit code: 1 for bad data (a repeated id, a broken sizes.json), 2 for a flag or
key that does not fit (an id column the manifest lacks, --samples-per-shard 0); never a traceback."""
import os

import pytest

from align.cli import main as align_main
from tests.conftest import TINY_CLIP
from tests.test_manifest import make_catalogue, write_csv
from tests.test_shards import write_shards


def run(capsys, *argv):
    """(exit code, stderr) of ``align ARGV``; an exception escaping main fails the test."""
    code = align_main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def train_args(data, out, *extra):
    return ["train", "model.embed_dim=32",
            "model.towers.image.type=open_clip_image", f"model.towers.image.model={TINY_CLIP}",
            "model.towers.text.type=open_clip_text", f"model.towers.text.model={TINY_CLIP}",
            f"data.train={data}", "data.val=''", "data.columns.text=[title]", "data.columns.audio=null",
            "data.batch_size=2", "data.num_workers=0", "train.max_steps=1", f"train.output_dir={out}",
            "train.wandb=disabled", "train.progress=false", *extra]


@pytest.fixture
def catalogue(tmp_path):
    """Six rows with images; row 5 (line 6, header = line 1) repeats row 1's id (line 2)."""
    rows = make_catalogue(tmp_path, n=6, audio=False)
    unique = write_csv(tmp_path / "unique.csv", rows)
    repeated = write_csv(tmp_path / "repeated.csv", rows[:4] + [dict(rows[4], id=rows[0]["id"])] + rows[5:])
    return unique, repeated


# ---------------------------------------------------------------- align train
def test_train_with_a_repeated_id_exits_1_naming_both_rows_before_writing(catalogue, tmp_path, capsys):
    _, repeated = catalogue
    code, err = run(capsys, *train_args(repeated, tmp_path / "run"))
    assert code == 1
    assert f"duplicate id 'item000' at {repeated}:2 and {repeated}:6" in err
    assert not os.path.exists(tmp_path / "run" / "config.yaml")


def test_train_with_an_id_column_the_manifest_lacks_exits_2_naming_file_and_key(catalogue, tmp_path, capsys):
    unique, _ = catalogue
    code, err = run(capsys, *train_args(unique, tmp_path / "run", "data.columns.id=sku"))
    assert code == 2
    assert f"config error: {unique}: required id column 'sku' is missing" in err and "data.columns.id" in err


@pytest.mark.parametrize("damage, expected", [
    ("delete", "needs each shard's sample count from sizes.json"),
    ("{not json", "sizes.json: not valid JSON"),
    ('["shards-000000.tar"]', "sizes.json: expected an object of shard name -> sample count"),
    ('{"shards-000000.tar": -3}', "sizes.json: expected an object of shard name -> sample count"),
], ids=["missing", "not JSON", "a list", "a negative count"])
def test_train_on_shards_without_a_usable_sizes_json_exits_1_naming_it(tmp_path, capsys, damage, expected):
    spec, _ = write_shards(str(tmp_path / "shards"), [3, 3], audio=False)
    sizes = tmp_path / "shards" / "sizes.json"
    if damage == "delete":
        os.remove(sizes)
    else:
        sizes.write_text(damage)
    code, err = run(capsys, *train_args(spec, tmp_path / "run"))
    assert code == 1
    assert expected in err
    assert str(tmp_path / "shards") in err  # the folder (or a shard in it) is named


# ---------------------------------------------------------------- align prep shards
def shard_job(capsys, manifest, out, *extra):
    return run(capsys, "prep", "shards", manifest, "--out", out, "--workers", "1", "--clip-seconds", "0.02", *extra)


def earlier_job(capsys, manifest, out):
    assert shard_job(capsys, manifest, out, "--samples-per-shard", "3")[0] == 0


def cut_short_settings(capsys, manifest, out):
    earlier_job(capsys, manifest, out)
    with open(os.path.join(out, ".prep", "settings.json"), "w") as handle:
        handle.write('{"manifest": ')


@pytest.mark.parametrize("manifest, extra, before, code, expected", [
    ("nope.csv", [], None, 2, "config error: manifest {dir}/nope.csv does not exist"),
    ("repeated.csv", [], None, 1, "duplicate id 'item000' at {dir}/repeated.csv:2 and {dir}/repeated.csv:6"),
    ("unique.csv", ["--col-id", "sku"], None, 2, "config error: {dir}/unique.csv: required id column 'sku' is missing"),
    # a column asked for by name and absent: every sample lost it without a word (exit 0)
    ("unique.csv", ["--col-image", "img"], None, 2, "config error: --col-image img: {dir}/unique.csv has no column 'img'"),
    ("unique.csv", ["--col-text", "title,blurb"], None, 2,
     "config error: --col-text title,blurb: {dir}/unique.csv has no column 'blurb'"),
    ("unique.csv", ["--col-group", "family"], None, 2, "config error: --col-group family: {dir}/unique.csv has no column"),
    ("unique.csv", ["--samples-per-shard", "0"], None, 2, "config error: --samples-per-shard must be positive, got 0"),
    ("unique.csv", ["--samples-per-shard", "2"], earlier_job, 2,
     "config error: --out {dir}/out holds shards of a different job (changed: ['samples_per_shard'])"),
    ("unique.csv", ["--samples-per-shard", "3"], cut_short_settings, 1, "{dir}/out/.prep/settings.json: not valid JSON"),
], ids=["missing manifest", "repeated id", "wrong --col-id", "absent --col-image", "absent --col-text",
        "absent --col-group", "no samples per shard", "another job's --out",
        "cut-short settings.json"])
def test_prep_shards_refuses_bad_input_with_a_message_and_exit_code(catalogue, tmp_path, capsys, manifest, extra,
                                                                    before, code, expected):
    out = str(tmp_path / "out")
    if before is not None:
        before(capsys, str(tmp_path / "unique.csv"), out)
    got, err = shard_job(capsys, str(tmp_path / manifest), out, *extra)
    assert got == code
    assert expected.format(dir=tmp_path) in err
