"""Where and when a benchmark ran: machine, CPU, date, load average before and after, versions, command line.

A measured time means little without the machine's load beside it (the development machine is shared), and a
number without the code version and the command that printed it cannot be reproduced. `Provenance.start()` at the
top of a run takes the load average before; `line()` (printed with the table) and `record()` (stored in a JSON)
take it again at the end.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VERSIONS = ("torch", "transformers", "optimum-oats")


def utc_now() -> str:
    """The time now, UTC, to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def processor() -> str:
    """The short processor name Python reports (`x86_64` where it reports none)."""
    return platform.processor() or platform.machine()


def cpu_name() -> str:
    """The CPU model and the number of logical CPUs, e.g. `AMD EPYC 7B13 x2` (Linux); `N CPUs` elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


def threads() -> int | None:
    """torch's intra-op threads when torch is imported, else `$OMP_NUM_THREADS` (None when unset)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() else None


def machine() -> dict:
    """Host, processor, CPU count, torch threads and version: what a stored cell says of its machine."""
    import torch

    return {
        "host": socket.gethostname(),
        "processor": processor(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def versions(names: tuple[str, ...] = VERSIONS) -> dict[str, str]:
    """The installed version of each distribution in `names` ("not installed" where it is not)."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def code_version(repo: Path = REPO) -> str | None:
    """The checkout's commit (`git rev-parse --short HEAD`), `+dirty` with uncommitted changes; None without git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def command_line() -> str:
    """How this process was started, as a shell line (`python benchmarks/x.py --flag value`)."""
    return shlex.join(["python", *sys.argv])


def _load() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # not on this platform
        return (float("nan"),) * 3


@dataclass
class Provenance:
    """A run's provenance, started when the run starts; `record()` and `line()` read the end state when called."""

    started: str
    load_before: tuple[float, float, float]
    command: str
    code: str | None = None
    extra_versions: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def start(cls, *extra_versions: str) -> Provenance:
        """Take the start time, load average and command line now; `extra_versions` are further distributions."""
        return cls(utc_now(), _load(), command_line(), code_version(), tuple(extra_versions))

    def record(self) -> dict:
        """Everything, for a JSON file: the end time and load average are taken now."""
        return {
            "started": self.started,
            "finished": utc_now(),
            "host": socket.gethostname(),
            "cpu": cpu_name(),
            "threads": threads(),
            "load_before": [round(x, 2) for x in self.load_before],
            "load_after": [round(x, 2) for x in _load()],
            "python": platform.python_version(),
            "versions": versions(VERSIONS + self.extra_versions),
            "code": self.code,
            "command": self.command,
        }

    def line(self) -> str:
        """One line for the printed output: date, CPU, threads, load (1 min) before -> now, versions, code, command."""
        r = self.record()
        stack = ", ".join(f"{name} {version}" for name, version in r["versions"].items())
        return (
            f"provenance: {r['started']} to {r['finished']}, {r['cpu']}, threads {r['threads']}, load "
            f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}; python {r['python']}, {stack}, "
            f"code {r['code'] or 'unknown'}; `{r['command']}`"
        )
