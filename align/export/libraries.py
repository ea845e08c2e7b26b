"""The optional libraries an export format needs, and whether they are installed.

sentence-transformers, onnx, onnxruntime and onnxscript are not install requirements of ``align``
(setup.cfg puts them in the ``export`` and ``dev`` extras). A format whose library is missing is
one the export cannot write, said with the reason like a tower it cannot write (``*_problem``), so
the check must run before anything imports the library: it looks the module up without importing it.
"""
from __future__ import annotations

import importlib.util
from typing import Mapping, Optional


def missing_library(packages: Mapping[str, str], install: str) -> Optional[str]:
    """"<package> is not installed (<install>)" for the first of ``packages`` ({module name: the
    name pip knows it by}) whose module cannot be found, or None."""
    for module, package in packages.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install: sys.modules holds a module without a spec
            found = False
        if not found:
            return f"{package} is not installed ({install})"
    return None
