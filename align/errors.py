"""The leaf every other module may import: error types, modality names, atomic file and folder writes.

It imports nothing of ours, so config, towers, data, losses and train can all share these
names without tying each other into an import circle.

Two kinds of error end a command with a message and a non-zero exit instead of a traceback
(``align/cli.py``):

* ``ConfigError``: a config value or a path it names cannot be used (exit 2, before any work);
* ``RunError``: an expected failure during a run: too many bad samples, a media root gone
  mid-run, a disk full while writing a checkpoint, an unsafe checkpoint file (exit 1).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, List, Optional, TextIO

MODALITIES = ("text", "image", "audio")
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the dotted key (or the file)."""


class RunError(RuntimeError):
    """An expected failure during a run; the message names the file, row or key and what to do."""


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str = "utf-8", newline: Any = None) -> Iterator[TextIO]:
    """Write ``path`` through a temporary file in the same folder, renamed over it when the
    ``with`` block ends without error: readers see the old file or the whole new one, never half.
    A failed write (a full disk) leaves the old file as it was and removes the temporary one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        kwargs = {} if "b" in mode else {"encoding": encoding, "newline": newline}
        with open(tmp, mode, **kwargs) as stream:
            yield stream
        # The usual mode, set last: mkstemp makes the file private, and so does a writer that
        # replaces it by name (safetensors' save_file makes 0600 files).
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json_atomic(data: Any, path: str) -> None:
    """``data`` as indented JSON at ``path``, written atomically (see ``atomic_open``)."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def check_json_output(path: Optional[str], file_name: str, flag: str = "--output") -> None:
    """A ``ConfigError`` naming ``flag`` when ``path`` is an existing folder. A command writes its
    JSON there at the end of its work, where the rename would fail after everything was computed;
    ``file_name`` is the file the message suggests inside it."""
    if path and os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a folder; give the JSON file's path, e.g. "
                          f"{os.path.join(path, file_name)}")


@contextlib.contextmanager
def staged_folder(out: str) -> Iterator[str]:
    """A temporary folder beside ``out`` to write into. When the block ends without error it gets
    the umask's usual modes, with everything in it (mkdtemp makes a private folder, and some
    writers private files: what we write is for others to read), and replaces ``out``
    (``replace_folder``); on an error it is removed and ``out`` is left as it was."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".tmp", dir=parent)
    try:
        yield staging
        usual_modes(staging)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_staged_leftovers(out: str) -> List[str]:
    """Delete the staging (``.tmp``) and set-aside (``.old``) folders that a process killed inside
    ``staged_folder`` left beside ``out``; their names. Call it only where no other process may be
    staging ``out`` (a run's main process on its own output folder)."""
    parent, base = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        return []
    gone = sorted(name for name in os.listdir(parent) if name.startswith(f".{base}.")
                  and name.endswith((".tmp", ".old")) and os.path.isdir(os.path.join(parent, name)))
    for name in gone:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return gone


def usual_modes(folder: str) -> None:
    """The umask's usual modes for ``folder`` and everything in it."""
    os.chmod(folder, 0o777 & ~_UMASK)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~_UMASK)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~_UMASK)


def replace_folder(staging: str, out: str) -> None:
    """Put the folder ``staging`` at ``out``. An existing ``out`` is exchanged with it in one
    ``renameat2(RENAME_EXCHANGE)`` where the kernel and filesystem allow it (a reader never finds
    ``out`` missing), else moved aside first; the old folder is then removed."""
    out = os.path.abspath(out)
    if not os.path.exists(out):
        os.replace(staging, out)
        return
    if not _exchange(staging, out):
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".old", dir=os.path.dirname(out))
        os.rmdir(aside)
        os.replace(out, aside)
        os.replace(staging, out)
        staging = aside
    shutil.rmtree(staging, ignore_errors=True)  # now the old folder


def _exchange(first: str, second: str) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 / not Linux
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0
