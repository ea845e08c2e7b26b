"""benchmarks/gpu_throughput.py cannot rot: its CPU mode (tiny model, tiny batches, the loss at a
small B) runs every part a GPU run runs (both model steps, both trainers end to end from the demo
catalogue, our trainer from JPEG shards, the three losses) and ends with the JSON line a GPU run
is read by: exactly the agreed keys, each a positive finite number."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.once

# The keys (issue 16, item 4), written out here rather than imported from the script.
KEYS = {"ours_step_sps", "openclip_step_sps", "ours_mfu", "ours_e2e_sps", "openclip_e2e_sps", "e2e_over_step",
        "loss_s_65536", "openclip_loss_s_65536", "matmul_s_65536", "loss_mb_65536", "loss_s_1m"}


def test_cpu_mode_ends_with_every_figure_positive_and_finite(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               CUDA_VISIBLE_DEVICES="")  # the CPU mode, even on a machine with a GPU
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_throughput.py"), "--quick",
                           "--work", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert set(figures) == KEYS
    for key, value in figures.items():
        # Memory too: on CPU it is the child's resident high-water growth over the call (documented).
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)
    assert figures["ours_mfu"] < 1, "a utilisation above 100% means a wrong FLOP count or peak"
    # over our step on the end-to-end run's own titles (our text tower skips padding: (a)'s
    # full-context texts are more work a sample), which the table prints
    titles_step = next(float(line.split()[5]) for line in lines if line.strip().startswith("model step on those titles"))
    # the printed figure has one decimal: its rounding, relatively, plus the JSON's own
    assert math.isclose(figures["e2e_over_step"], figures["ours_e2e_sps"] / titles_step,
                        rel_tol=0.05 / titles_step + 1e-3)
    # The sizes behind the keys are printed (at tiny size *_65536 is not B = 65536).
    assert any("the JSON's *_65536 is B=1024, *_1m is B=2048" in line for line in lines)
