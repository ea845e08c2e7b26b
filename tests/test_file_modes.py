"""What we write is for others to read: files and folders get the umask's usual modes, never the
private ones that mkstemp, mkdtemp and safetensors' writer leave (align/errors.py)."""
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from align.errors import atomic_open, remove_staged_leftovers, staged_folder, write_json_atomic
from align.loading import read_tensors, write_tensors


def usual_modes():
    """(file mode, folder mode) under this process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask, 0o777 & ~mask


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_and_safetensors_files_get_the_usual_mode(tmp_path):
    write_json_atomic({"a": 1}, str(tmp_path / "a.json"))
    write_tensors({"w": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    with atomic_open(str(tmp_path / "b.bin"), "wb") as handle:
        handle.write(b"x")
    for name in ("a.json", "w.safetensors", "b.bin"):
        assert mode(tmp_path / name) == usual_modes()[0], name
    assert torch.equal(read_tensors(str(tmp_path / "w.safetensors"))[0]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin", "w.safetensors"]  # no temporary file left


def test_a_staged_folder_replaces_its_target_whole_with_usual_modes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_folder(str(out)) as staging:
        os.mkdir(os.path.join(staging, "sub"), 0o700)
        handle = os.open(os.path.join(staging, "sub", "new.txt"), os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(handle, b"new")
        os.close(handle)
        assert not (out / "sub").exists()  # nothing in view before the block ends
    assert sorted(os.listdir(out)) == ["sub"] and (out / "sub" / "new.txt").read_text() == "new"
    files, folders = usual_modes()
    assert mode(out) == folders and mode(out / "sub") == folders and mode(out / "sub" / "new.txt") == files
    assert sorted(os.listdir(tmp_path)) == ["out"]  # neither the staging folder nor the old one is left


def test_a_failed_staged_folder_leaves_its_target_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_folder(str(out)) as staging:
            (tmp_path / "seen").write_text(staging)
            open(os.path.join(staging, "half.txt"), "w").close()
            raise RuntimeError("disk full")
    assert sorted(os.listdir(out)) == ["old.txt"] and (out / "old.txt").read_text() == "old"
    assert not os.path.exists((tmp_path / "seen").read_text())


def test_a_process_killed_inside_a_staged_folder_leaves_only_leftovers_that_are_then_removed(tmp_path):
    """SIGKILL while staging: ``out`` keeps its old contents, and ``remove_staged_leftovers`` deletes
    the staging folder but nothing else beside it (another target's staging, the target itself)."""
    out = tmp_path / "best"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (tmp_path / ".bestish.a1b2c3d4.tmp").mkdir()  # another target's
    (tmp_path / ".best.notes").write_text("kept")
    writer = ("import sys, time\nfrom align.errors import staged_folder\n"
              "with staged_folder(sys.argv[1]) as staging:\n"
              "    open(staging + '/half.txt', 'w').write('half')\n    print(staging, flush=True)\n    time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", writer, str(out)], stdout=subprocess.PIPE, text=True)
    staging = process.stdout.readline().strip()
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert os.path.isfile(os.path.join(staging, "half.txt"))  # the kill left it
    assert sorted(os.listdir(out)) == ["old.txt"]
    assert remove_staged_leftovers(str(out)) == [os.path.basename(staging)]
    assert sorted(os.listdir(tmp_path)) == [".best.notes", ".bestish.a1b2c3d4.tmp", "best"]
    assert remove_staged_leftovers(str(tmp_path / "nowhere" / "best")) == []
