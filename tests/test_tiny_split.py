"""A training split smaller than one optimiser step (training drops an epoch's partial last
step) is refused with the split and its row count, exit 2, before the run folder is written."""
import pytest

from align.cli import main as align_main
from tests.test_preflight import run_overrides


@pytest.mark.parametrize("extra,per_step", [(["data.batch_size=8"], "8 = data.batch_size 8 x 1 process(es) x "
                                                                     "train.accum_steps 1"),
                                            (["data.batch_size=4", "train.accum_steps=2"], "8 = data.batch_size 4")])
def test_a_split_smaller_than_one_step_is_refused_before_writing(tmp_path, capsys, extra, per_step):
    manifest = tmp_path / "train.csv"
    manifest.write_text("id,title\n" + "".join(f"sku-{i},mug {i}\n" for i in range(5)))
    out = tmp_path / "run"
    assert align_main(["train", *run_overrides(str(manifest), out, "data.num_workers=0", *extra)]) == 2
    err = capsys.readouterr().err
    assert f"data.train: {manifest} has 5 rows, fewer than one training step takes ({per_step}" in err
    assert not out.exists()
