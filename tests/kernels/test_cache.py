"""The kernel cache survives what an unlucky machine does to it: a build killed with `kill -9`, a stale lock, a
truncated library, and callers with another `ninja` first on `PATH`.

Each case runs in a fresh process with a timeout (a hang fails the test instead of blocking the suite), on a copy
of the cache folder that the `kernel` fixture built, so only the truncated-library test compiles (~1 to 5 min on a
loaded machine; marked slow).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optimum_oats.kernels import CACHE_ENV, LOCK, OWNER, RECORD, TIMEOUT_ENV, build_kernels, build_location

LOAD = (
    "import logging, warnings; logging.basicConfig(level=logging.INFO)\n"
    "import torch\n"
    "from optimum_oats.kernels import load_kernel, build_kernels\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "    warnings.simplefilter('always')\n"
    "    kernel = load_kernel()\n"
    "print('WARNINGS', ' | '.join(str(w.message) for w in caught))\n"
    "if kernel is not None:\n"
    "    print('ISA', kernel.isa())\n"
    "    print('RESULT', json.dumps(build_kernels()))\n"
)


def _load(cache: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`load_kernel()` in a fresh process using the cache root `cache`; raises `TimeoutExpired` on a hang."""
    return subprocess.run(
        [sys.executable, "-c", "import json\n" + LOAD],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, CACHE_ENV: str(cache), **env},
    )


def _result(process: subprocess.CompletedProcess) -> dict:
    line = next((ln for ln in process.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, process.stdout + process.stderr[-3000:]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A cache root holding an intact build (a copy of the one `build_kernels()` made or found)."""
    build_kernels()
    name, folder = build_location()
    root = tmp_path_factory.mktemp("kernel-cache")
    shutil.copytree(folder, root / name, ignore=shutil.ignore_patterns(LOCK, OWNER, "lock"))
    return root


@pytest.fixture
def cache(built, tmp_path) -> tuple[Path, Path]:
    """A private copy of the built cache root, and its build folder."""
    root = tmp_path / "cache"
    shutil.copytree(built, root)
    name, _ = build_location()
    return root, root / name


def _stamp(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.name not in (LOCK, OWNER)}


@pytest.mark.slow
def test_another_ninja_first_on_path_compiles_nothing(cache):
    """The cache rebuilt silently when a caller had the system's `ninja` first on `PATH` (its log format differs
    from the venv's `ninja`): a recorded, intact library is loaded without asking ninja."""
    root, folder = cache
    before = _stamp(folder)
    system_path = os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir())
    for path in (system_path, os.pathsep.join([str(Path(sys.executable).parent), system_path])):
        process = _load(root, PATH=path)
        assert process.returncode == 0, process.stderr[-3000:]
        assert _result(process)["compiled_now"] is False
        assert "Compiling" not in process.stderr
    assert _stamp(folder) == before  # nothing rebuilt, relinked or rewritten


@pytest.mark.slow
def test_stale_locks_of_a_killed_build_do_not_hang(cache):
    """torch's 0-byte `lock` (left by `kill -9` during a build) made every later process wait forever."""
    root, folder = cache
    (folder / "lock").write_bytes(b"")
    (folder / LOCK).write_bytes(b"")
    (folder / OWNER).write_text("999999999")  # no such process
    process = _load(root, timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    assert _result(process)["compiled_now"] is False


@pytest.mark.slow
def test_kill_during_the_first_build_does_not_block_the_next_process(tmp_path):
    """A build killed with SIGKILL mid-compile; the next process must not hang. It gets a compiler that fails at
    once (so this test compiles nothing to completion) and must fall back with the usual warning."""
    name, _ = build_location()
    folder = tmp_path / name
    build = subprocess.Popen(
        [sys.executable, "-c", "from optimum_oats.kernels import build_kernels; build_kernels()"],
        env={**os.environ, CACHE_ENV: str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches ninja and the compiler too
    )
    try:
        deadline = time.monotonic() + 240
        while not (folder / "lock").exists():  # torch's baton: the compile has started
            assert build.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        os.killpg(build.pid, signal.SIGKILL)
    finally:
        build.wait()
    assert (folder / "lock").exists()  # what used to block every later process

    started = time.monotonic()
    process = _load(tmp_path, timeout=180, CXX="/nonexistent/c++", CC="/nonexistent/cc")
    assert process.returncode == 0, process.stderr[-3000:]
    assert "could not build its CPU kernel" in process.stdout
    assert "Compiling the optimum-oats CPU kernel" in process.stderr  # says it rebuilds, and why
    assert time.monotonic() - started < 180
    assert not (folder / "lock").exists()


@pytest.mark.slow
def test_waiting_for_a_live_build_gives_up_naming_the_folder(tmp_path):
    """A build lock held by a live process (this one) is waited for, up to OATS_KERNEL_BUILD_TIMEOUT."""
    from filelock import FileLock

    name, _ = build_location()
    folder = tmp_path / name
    folder.mkdir()
    (folder / OWNER).write_text(str(os.getpid()))
    with FileLock(folder / LOCK):
        process = _load(tmp_path, timeout=120, **{TIMEOUT_ENV: "2"})
    assert process.returncode == 0, process.stderr[-3000:]
    assert "could not build its CPU kernel (TimeoutError" in process.stdout
    assert f"pid {os.getpid()}" in process.stdout and f"delete the folder {folder}" in process.stdout


@pytest.mark.slow
def test_truncated_library_is_rebuilt_not_loaded(cache):
    """A truncated library killed the process with `Bus error` at dlopen: it is now found damaged by its record,
    rebuilt with a warning saying why, and the rebuilt one works and is recorded."""
    root, folder = cache
    name, _ = build_location()
    library = folder / f"{name}.so"
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 2])
    (folder / "lock").write_bytes(b"")  # as a build killed while relinking would leave it too
    process = _load(root, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    assert "is damaged" in process.stderr and "Compiling the optimum-oats CPU kernel" in process.stderr
    result = _result(process)
    assert result["compiled_now"] is True and "damaged" in result["compiled_because"]
    record = json.loads((folder / RECORD).read_text())
    assert record["size"] == library.stat().st_size
    assert _result(_load(root))["compiled_now"] is False  # and the next process just loads it
