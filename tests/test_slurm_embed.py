"""slurm/embed.sbatch on a real cluster (slurm/local_cluster.sh): a two-task job array embeds a
catalogue in parts, its last task merges, and the merge step after it finds nothing left to do;
the merged vectors are those of one `align embed` process, bit for bit."""
import os
import subprocess

import pytest

from align.index.embed import PARTS
from align.index.vectors import load_item_embeddings
from tests.conftest import REPO, one_step_checkpoint
from tests.slurm_cluster import cancel, require_cluster, submit, wait_for_state
from tests.test_embed_sharded import assert_identical

pytestmark = pytest.mark.slurm

SCRIPT = os.path.join(REPO, "slurm", "embed.sbatch")
ENV = dict(os.environ, VENV=os.path.join(REPO, ".venv"), OMP_NUM_THREADS="1")  # the jobs inherit it


@pytest.fixture(scope="module")
def checkpoint(small_demo, tmp_path_factory):
    require_cluster()  # before training the model it would embed
    return one_step_checkpoint(small_demo, tmp_path_factory.mktemp("run"))


def embed_args(checkpoint, small_demo, out):
    manifests = [os.path.join(small_demo, name) for name in ("train.csv", "test.csv")]
    return ["--checkpoint", checkpoint, "--manifest", *manifests, "--out", str(out), "--device", "cpu",
            "--batch-size", "16", "--shards", "4"]


def read(path):
    with open(path) as handle:
        return handle.read()


def test_an_array_embeds_in_parts_and_merges_into_the_one_process_vectors(checkpoint, small_demo, tmp_path):
    args = embed_args(checkpoint, small_demo, tmp_path / "items")
    logs = str(tmp_path / "slurm-%A_%a.out")
    array = submit(["--chdir", str(tmp_path), "--array=0-1", "--output", logs, SCRIPT, *args], env=ENV)
    merge = submit(["--chdir", str(tmp_path), f"--dependency=afterok:{array}", "--output", logs, SCRIPT, *args,
                    "--merge-only"], env=ENV)
    try:
        # The reference, one process beside the jobs, with their thread count (vectors depend on it).
        one = subprocess.run([os.path.join(REPO, ".venv", "bin", "align"), "embed",
                              *embed_args(checkpoint, small_demo, tmp_path / "one")[:-2]],
                             env=ENV, capture_output=True, text=True, timeout=120)
        assert one.returncode == 0, one.stderr
        wait_for_state(array, ["COMPLETED"], timeout=120)
        wait_for_state(merge, ["COMPLETED"], timeout=60)
    finally:
        cancel(array)
        cancel(merge)

    assert_identical(load_item_embeddings(str(tmp_path / "items")), load_item_embeddings(str(tmp_path / "one")))
    assert not os.path.exists(tmp_path / "items" / PARTS)
    task_logs = [read(tmp_path / f"slurm-{array}_{task}.out") for task in (0, 1)]
    for task, log in enumerate(task_logs):  # each task embedded its own two shards of the four
        assert f"array task {task} of 2" in log
        assert all(f"shard {j + 1}/4: " in log for j in (task, task + 2)), log
    merged = [log for log in task_logs if "embedded 200 items" in log]
    assert len(merged) == 1, task_logs  # the last task to finish merged, once
    assert "nothing to do" in read(tmp_path / f"slurm-{merge}_4294967294.out")


def test_an_array_that_does_not_start_at_0_is_refused(tmp_path):
    require_cluster()
    job = submit(["--chdir", str(tmp_path), "--array=1-2", "--output", str(tmp_path / "slurm-%A_%a.out"), SCRIPT,
                  "--checkpoint", "x", "--manifest", "x.csv", "--out", "x"], env=ENV)
    try:
        wait_for_state(job, ["FAILED"], timeout=60)
    finally:
        cancel(job)
    assert "--part needs the indices 0..n-1, e.g. --array=0-1" in read(tmp_path / f"slurm-{job}_1.out")
