"""Compiled CPU kernels, built from the shipped C++ sources on first use and cached.

One extension holds `LinearSparseLowRank`'s forward and the fast OATS solver's fused thresholding step.

The extension is compiled once per (sources and their folder, compiler flags, CPU, torch version, Python
environment) into a cache folder (`OATS_KERNEL_CACHE`, default `~/.cache/optimum_oats/kernels`), so two virtualenvs
or two clones never rebuild over each other. `optimum-oats build-kernels` (run by the set-up script) builds it ahead
of time instead of inside a user's first `generate()`. If the compiler is missing or the build fails, a warning is
emitted once and callers fall back to the pure-PyTorch path, which is always correct. Setting
`OATS_DISABLE_KERNELS=1` takes that fallback path on purpose. The layer's forward is also registered as the
`torch.library` custom op `optimum_oats::sparse_lowrank_forward` (`ops.py`).

The cache is made safe against interrupted and concurrent builds:

- a build writes a record of the library's size and sha256 (`oats-build.json`); a later process loads the library
  directly when it matches the record, without asking ninja (whose rebuild check depends on which `ninja` is on
  `PATH`), and rebuilds, with a warning saying why, when it does not (a truncated library would otherwise crash the
  process with `Bus error` at `dlopen`);
- builds are serialized by an OS file lock (`flock`), which dies with its holder: a build killed with `kill -9`
  blocks nothing, and the 0-byte `lock` that torch's own build leaves behind is removed before rebuilding. Waiting
  for a live build gives up after `OATS_KERNEL_BUILD_TIMEOUT` seconds (default 1800) with a message naming the
  folder;
- a build always uses this environment's `ninja`, and says that it compiles and why (a WARNING log line).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch

from ..utils.files import atomic_write_json, file_sha256

logger = logging.getLogger(__name__)

DISABLE_ENV = "OATS_DISABLE_KERNELS"
CACHE_ENV = "OATS_KERNEL_CACHE"
SOURCES = ("sparse_lowrank.cpp", "oats_threshold.cpp")  # one extension module; bindings in the first
CFLAGS = ["-O3", "-march=native", "-fopenmp"]

TIMEOUT_ENV = "OATS_KERNEL_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT = 1800.0  # seconds to wait for another process's build (one takes about a minute)
RECORD = "oats-build.json"  # size and sha256 of the library, written after a build
LOCK = "oats-build.lock"  # flock'ed while a process builds
OWNER = "oats-build.owner"  # the pid of the process building now, for messages

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failed = False
_compiled_because: str | None = None  # why this process compiled the extension (None: loaded from the cache)


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


def _library(name: str, cache: Path) -> Path:
    from torch.utils.cpp_extension import LIB_EXT

    return cache / f"{name}{LIB_EXT}"


def _cache_problem(name: str, cache: Path) -> str | None:
    """Why the cached library cannot be loaded as it is (None: it matches the record written when it was built).

    The record (size and sha256) is checked before `dlopen`: a truncated library would kill the process with
    `Bus error`, and one without a record may be the torn output of a killed build.
    """
    library, record_path = _library(name, cache), cache / RECORD
    if not library.is_file():
        return "no cached build for this environment"
    try:
        record = json.loads(record_path.read_text())
        size, digest = int(record["size"]), str(record["sha256"])
    except FileNotFoundError:
        return f"{library.name} has no build record (an interrupted build, or one by an older version)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its build record {record_path} is unreadable ({type(err).__name__})"
    found = library.stat().st_size
    if found != size:
        return f"the cached {library.name} is damaged ({found} bytes, {size} when built)"
    if file_sha256(library) != digest:
        return f"the cached {library.name} is damaged (its sha256 differs from the one recorded at build)"
    return None


def is_built() -> bool:
    """Whether a library for this exact build is in the cache and intact (loading it then compiles nothing)."""
    name, cache = build_location()
    return _cache_problem(name, cache) is None


def _import_library(name: str, library: Path) -> ModuleType:
    """Load the extension from its file, as torch does after a build, without asking ninja whether to rebuild."""
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return float(value) if value else DEFAULT_BUILD_TIMEOUT
    except ValueError:
        raise ValueError(f"`{TIMEOUT_ENV}` must be a number of seconds, got {value!r}.") from None


@contextmanager
def _build_lock(cache: Path) -> Iterator[None]:
    """Hold the cache folder's build lock: an OS file lock (`flock`), which the kernel releases when its holder
    dies, so a build killed with `kill -9` never blocks the next process. Waiting for a live builder gives up after
    `OATS_KERNEL_BUILD_TIMEOUT` seconds with a message naming the folder."""
    from filelock import FileLock, Timeout

    lock, owner = FileLock(cache / LOCK), cache / OWNER
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.is_file() else "unknown"
        logger.warning("Waiting for another process (pid %s) that is building the CPU kernel in %s", holder, cache)
        timeout = _build_timeout()
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise TimeoutError(
                f"Another process (pid {holder}) has held the CPU kernel build lock in {cache} for over "
                f"{timeout:g} s. If no build is running, delete the folder {cache} and retry; "
                f"set {TIMEOUT_ENV} to wait longer."
            ) from None
    try:
        owner.write_text(str(os.getpid()))
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _clear(cache: Path) -> None:
    """Empty the build folder but for the lock: a rebuild starts from the sources, and torch's own `lock` file (a
    0-byte baton that waits forever once its builder was killed) goes too, which is safe under our lock."""
    for path in cache.iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _ninja_dir() -> str:
    """The folder of the `ninja` this environment installed (the `ninja` package, else the interpreter's scripts
    folder): the same one for every build, whichever `ninja` comes first on the caller's `PATH`."""
    try:
        import ninja

        return str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        return sysconfig.get_path("scripts")


def _compile(name: str, cache: Path, paths: list[str]) -> ModuleType:
    from torch.utils.cpp_extension import load

    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([_ninja_dir(), path]) if path else _ninja_dir()
    try:
        return load(
            name=name,
            sources=paths,
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(cache),
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path


def _build() -> tuple[ModuleType, str | None]:
    """The extension and why it was compiled now (None: loaded from the cache)."""
    name, cache = build_location()
    cache.mkdir(parents=True, exist_ok=True)
    library = _library(name, cache)
    if _cache_problem(name, cache) is None:
        logger.debug("Loading the cached optimum-oats CPU kernel from %s", library)
        return _import_library(name, library), None
    with _build_lock(cache):
        reason = _cache_problem(name, cache)  # another process may have built it while this one waited
        if reason is None:
            return _import_library(name, library), None
        logger.warning("Compiling the optimum-oats CPU kernel in %s (about a minute, once): %s", cache, reason)
        _clear(cache)
        sources = [resources.files(__name__).joinpath(source) for source in SOURCES]
        with ExitStack() as stack:
            paths = [str(stack.enter_context(resources.as_file(source))) for source in sources]
            module = _compile(name, cache, paths)
        record = {"size": library.stat().st_size, "sha256": file_sha256(library), "torch": torch.__version__}
        atomic_write_json(cache / RECORD, record, indent=1)
        os.chmod(cache / RECORD, 0o644)  # like the library: readable by whoever shares the cache
        return module, reason


def load_kernel() -> ModuleType | None:
    """The compiled extension, or `None` when it is disabled or could not be built (warned once)."""
    global _loaded, _failed, _compiled_because
    if kernels_disabled():
        return None
    if _loaded is not None or _failed:
        return _loaded
    with _lock:
        if _loaded is None and not _failed:
            try:
                _loaded, _compiled_because = _build()
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = load_kernel()
    if kernel is None:
        reason = "; ".join(str(w.message) for w in caught) or "the build failed earlier in this process"
        raise RuntimeError(f"The CPU kernel could not be built: {reason}")
    name, cache = build_location()
    return {
        "kernel": name,
        "folder": str(cache),
        "compiled_now": _compiled_because is not None,
        "compiled_because": _compiled_because,
        "avx512": bool(kernel.uses_avx512()),
    }


__all__ = [
    "CACHE_ENV",
    "DISABLE_ENV",
    "TIMEOUT_ENV",
    "build_kernels",
    "build_location",
    "is_built",
    "kernel_available",
    "kernels_disabled",
    "load_kernel",
]
