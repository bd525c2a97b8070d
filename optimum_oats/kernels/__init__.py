"""Compiled CPU kernels, built from the shipped C++ sources on first use and cached.

One extension holds `LinearSparseLowRank`'s forward and the fast OATS solver's fused thresholding step.

The extension is compiled once per (sources and their folder, compiler flags, CPU, torch version, Python
environment) into a cache folder (`OATS_KERNEL_CACHE`, default `~/.cache/optimum_oats/kernels`), so two virtualenvs
or two clones never rebuild over each other; later processes load the cached library. `optimum-oats build-kernels`
(run by the set-up script) builds it ahead of time instead of inside a user's first `generate()`. If the compiler
is missing or the build fails, a warning is emitted once and callers fall back to the pure-PyTorch path, which is
always correct. Setting `OATS_DISABLE_KERNELS=1` takes that fallback path on purpose. The layer's forward is also
registered as the `torch.library` custom op `optimum_oats::sparse_lowrank_forward` (`ops.py`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

DISABLE_ENV = "OATS_DISABLE_KERNELS"
CACHE_ENV = "OATS_KERNEL_CACHE"
SOURCES = ("sparse_lowrank.cpp", "oats_threshold.cpp")  # one extension module; bindings in the first
CFLAGS = ["-O3", "-march=native", "-fopenmp"]

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failed = False


def kernels_disabled() -> bool:
    """Whether the user turned the compiled kernel off with `OATS_DISABLE_KERNELS` (read at every call: the unset
    case, every decode step's, returns after one lookup)."""
    value = os.environ.get(DISABLE_ENV)
    return value is not None and value.strip().lower() not in ("", "0", "false", "no")


def _cpu_signature() -> str:
    # `-march=native` code must not be reused on another CPU sharing the cache folder (e.g. a network home).
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
                if line.startswith("flags"):
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def build_location() -> tuple[str, Path]:
    """The extension's module name and build folder: a digest of everything the build depends on.

    The sources' folder and the interpreter are part of it because the build files record absolute paths: two
    environments sharing one folder would otherwise rebuild over each other on every first call.
    """
    sources = [resources.files(__name__).joinpath(name) for name in SOURCES]
    texts = [source.read_text() for source in sources]
    environment = [str(Path(__file__).resolve().parent), sys.prefix, sys.version]
    parts = [*texts, " ".join(CFLAGS), _cpu_signature(), torch.__version__, *environment]
    name = f"oats_sparse_lowrank_{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]}"
    return name, Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "optimum_oats" / "kernels") / name


def is_built() -> bool:
    """Whether a library for this exact build is already in the cache (loading it then compiles nothing)."""
    name, cache = build_location()
    return any(cache.glob(f"{name}*.so"))


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    sources = [resources.files(__name__).joinpath(name) for name in SOURCES]
    name, cache = build_location()
    cache.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        paths = [str(stack.enter_context(resources.as_file(source))) for source in sources]
        if is_built():
            logger.debug("Loading the cached optimum-oats CPU kernel from %s", cache)
        else:
            logger.info("Building the optimum-oats CPU kernel in %s (once per environment, ~1 min)", cache)
        return load(
            name=name,
            sources=paths,
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(cache),
            verbose=False,
        )


def load_kernel() -> ModuleType | None:
    """The compiled extension, or `None` when it is disabled or could not be built (warned once)."""
    global _loaded, _failed
    if kernels_disabled():
        return None
    if _loaded is not None or _failed:
        return _loaded
    with _lock:
        if _loaded is None and not _failed:
            try:
                _loaded = _build()
            except Exception as err:  # any build or import failure means: use the PyTorch path
                _failed = True
                warnings.warn(
                    f"optimum-oats could not build its CPU kernel ({type(err).__name__}: {err}); "
                    "LinearSparseLowRank and the fast OATS solver fall back to their PyTorch paths (correct, slower). "
                    f"Install a C++ compiler (g++) and ninja, or set {DISABLE_ENV}=1 to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _loaded


def kernel_available() -> bool:
    return load_kernel() is not None


def build_kernels() -> dict[str, object]:
    """Build (or load) the extension now; what `optimum-oats build-kernels` reports.

    Raises:
        RuntimeError: the build failed or kernels are disabled; the message says why and what to install.
    """
    if kernels_disabled():
        raise RuntimeError(f"Kernels are disabled by {DISABLE_ENV}; unset it to build them.")
    was_built = is_built()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = load_kernel()
    if kernel is None:
        reason = "; ".join(str(w.message) for w in caught) or "the build failed earlier in this process"
        raise RuntimeError(f"The CPU kernel could not be built: {reason}")
    name, cache = build_location()
    return {"kernel": name, "folder": str(cache), "compiled_now": not was_built, "avx512": bool(kernel.uses_avx512())}


__all__ = [
    "CACHE_ENV",
    "DISABLE_ENV",
    "build_kernels",
    "build_location",
    "is_built",
    "kernel_available",
    "kernels_disabled",
    "load_kernel",
]
