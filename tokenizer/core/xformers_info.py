"""xformers as installed: its version, what its compiled extension was built for, and whether that extension
loaded (and the root cause when it did not).

xformers prints a multi-line "WARNING[XFORMERS]: xFormers can't load C++/CUDA extensions" when its extension
does not load, and diffusers imports xformers whenever it is installed, so every import of the base VQ
printed it. :func:`quiet_import_warning` (installed by ``tokenizer/__init__.py``, before anything can import
xformers) drops that one log record; xformers itself keeps the exception it describes, and
:func:`xformers_status` reads it back for ``alit doctor`` and for the attention fallback's warning.
``XFORMERS_MORE_DETAILS=1`` (xformers' own switch) lets the warning through.

Nothing here imports torch or xformers at module import (``alit --help`` stays fast).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

WARNING_PREFIX = "WARNING[XFORMERS]"  # xformers/_cpp_lib.py's import-time warning
DETAILS_ENV = "XFORMERS_MORE_DETAILS"


class _ImportWarningFilter(logging.Filter):
    """Drops xformers' import-time extension warning (and nothing else it logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(WARNING_PREFIX)


def quiet_import_warning() -> None:
    """Stop xformers' import-time "can't load C++/CUDA extensions" warning from printing (idempotent).

    The information is not lost: :func:`xformers_status` reports it, ``alit doctor`` prints it, and
    :func:`tokenizer.core.attention.xformers_usable` warns with it on the first CUDA tensor that would have
    used xformers. With ``XFORMERS_MORE_DETAILS`` set, xformers' warning prints as usual.
    """
    if os.environ.get(DETAILS_ENV):
        return
    logger = logging.getLogger("xformers")
    if not any(isinstance(f, _ImportWarningFilter) for f in logger.filters):
        logger.addFilter(_ImportWarningFilter())


@dataclass(frozen=True)
class XformersStatus:
    """What the installed xformers is and whether its compiled extension loaded."""

    installed: bool
    version: str | None = None  # the distribution's version (importlib.metadata)
    built_for_torch: str | None = None  # cpp_lib.json: the torch the extension was compiled against
    built_for_cuda: str | None = None  # e.g. "12.8" (cpp_lib.json stores 1208)
    imports: bool = False  # ``import xformers.ops`` succeeds
    extension_loaded: bool = False  # its _C extension (the CUDA kernels) loaded into this process
    reason: str | None = None  # why not (the root cause of the load failure), None when loaded

    def summary(self) -> str:
        """One line: version, build, and the extension's state."""
        if not self.installed:
            return "not installed"
        built = f"built for torch {self.built_for_torch}" if self.built_for_torch else "build unknown"
        if self.built_for_cuda:
            built += f" / CUDA {self.built_for_cuda}"
        state = "extension loaded" if self.extension_loaded else f"extension NOT loaded: {self.reason}"
        return f"{self.version} ({built}); {state}"


def _build_info() -> tuple[str | None, str | None]:
    """The torch and CUDA versions xformers' extension was built for, from its cpp_lib.json (not imported)."""
    spec = importlib.util.find_spec("xformers")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    path = Path(next(iter(spec.submodule_search_locations))) / "cpp_lib.json"
    try:
        version = json.loads(path.read_text()).get("version", {})
    except (OSError, ValueError):
        return None, None
    cuda = version.get("cuda")
    cuda_text = f"{cuda // 100}.{cuda % 100}" if isinstance(cuda, int) else None  # 1208 -> 12.8
    return version.get("torch"), cuda_text


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost cause (``libcudart.so.12: cannot open shared object file``...)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def xformers_status() -> XformersStatus:
    """The installed xformers and its extension's state in this process (imports xformers, quietly)."""
    try:
        version = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        return XformersStatus(installed=False, reason="xformers is not installed")
    torch_build, cuda_build = _build_info()
    quiet_import_warning()
    try:
        import xformers._cpp_lib as cpp_lib
        import xformers.ops  # noqa: F401  (what the attention function imports)
    except Exception as e:  # a broken install
        return XformersStatus(True, version, torch_build, cuda_build, reason=f"import fails: {_root_cause(e)}")
    exc = getattr(cpp_lib, "_cpp_library_load_exception", None)
    if exc is None and getattr(cpp_lib, "_build_metadata", None) is None:
        reason = "xformers reports no compiled extension"
        return XformersStatus(True, version, torch_build, cuda_build, imports=True, reason=reason)
    if exc is not None:
        return XformersStatus(True, version, torch_build, cuda_build, imports=True, reason=_root_cause(exc))
    return XformersStatus(True, version, torch_build, cuda_build, imports=True, extension_loaded=True)
