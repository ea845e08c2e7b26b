"""Under DDP the cached (GradCache) step synchronises gradients once per optimiser step."""
import json
import os

import pytest

from tests.conftest import REPO, launch_two_processes


@pytest.mark.multiprocess
@pytest.mark.once  # counts calls; the ranks' gradients compared exactly
def test_cached_step_all_reduces_once(tmp_path):
    out = tmp_path / "result.json"
    done = launch_two_processes(os.path.join(REPO, "tests", "dist_cached_worker.py"), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["plain_calls"] > 0
    # Three micro-batches plus the loss pass, but one all-reduce of the buckets, as in a plain step.
    assert result["cached_calls"] == result["plain_calls"]
    assert result["grads_equal_across_ranks"]
    assert result["grad_norm"] > 0
