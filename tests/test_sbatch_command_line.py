"""slurm/train.sbatch builds the task's `accelerate launch` command line as text for `bash -c`:
every argument must reach the launcher as the user gave it. Here srun and scontrol are stand-ins
that run the task's command on this machine and name it, and the launcher prints its arguments:
what is checked is the script's quoting, which the real one-node SLURM test (test_slurm_train.py)
runs with overrides that have no spaces."""
import json
import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.once  # shell quoting: no float in sight


def _script(path, text):
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def stand_ins(tmp_path):
    """(PATH with srun, scontrol and scancel stand-ins; a venv folder with a space in its path whose
    `accelerate` writes its arguments as JSON to <venv>/argv.json)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "srun", 'while [[ $1 == --* ]]; do shift; done\nexec "$@"\n')  # drop its options, run the task
    _script(bin_dir / "scontrol", "echo localhost\n")
    _script(bin_dir / "scancel", "true\n")
    venv = tmp_path / "my venv"
    (venv / "bin").mkdir(parents=True)
    launcher = venv / "bin" / "accelerate"
    launcher.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"json.dump(sys.argv[1:], open({str(venv / 'argv.json')!r}, 'w'))\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", venv


def launched(stand_ins, *arguments):
    path, venv = stand_ins
    env = dict(os.environ, PATH=path, VENV=str(venv), SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="7",
               SLURM_NODEID="0")
    done = subprocess.run(["bash", "slurm/train.sbatch", *arguments], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = json.loads((venv / "argv.json").read_text())
    return argv[argv.index("train.py") + 1:]


def test_the_config_and_overrides_reach_the_trainer_as_given(stand_ins):
    assert launched(stand_ins, "configs/demo.yaml") == ["--config", "configs/demo.yaml", "train.resume=latest"]
    assert launched(stand_ins, "my configs/demo.yaml", "train.output_dir=runs/a b", "optim.lr=3e-4") == [
        "--config", "my configs/demo.yaml", "train.resume=latest", "train.output_dir=runs/a b", "optim.lr=3e-4"]
