"""This process's resident memory over a block of code, for the benchmarks' CPU memory figures
(``python benchmarks/<name>.py`` puts this folder on the path)."""
from __future__ import annotations

from typing import Optional


def _status_kb(key: str) -> int:
    """A figure of /proc/self/status, in kB (VmRSS: resident now; VmHWM: its high-water mark)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {key}")


class ResidentPeak:
    """Growth of this process's resident memory over a block, in MB.

    ``ru_maxrss`` cannot be used: it keeps the high-water mark of the image this child was
    exec'd from (the parent's, through vfork), often above anything the loss touches. Writing
    5 to /proc/self/clear_refs resets VmHWM to VmRSS (Linux >= 4.0), so VmHWM after the block
    minus VmRSS before it is the block's own peak. Where that file cannot be written (not
    Linux, some sandboxes) ``mb`` is None: no figure rather than a wrong one.
    """

    def __enter__(self) -> "ResidentPeak":
        self.mb: Optional[float] = None
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
                clear.write("5")
            self.base_kb: Optional[int] = _status_kb("VmRSS")
        except OSError:
            self.base_kb = None
        return self

    def __exit__(self, *exc) -> None:
        if self.base_kb is not None:
            self.mb = (_status_kb("VmHWM") - self.base_kb) / 1024
