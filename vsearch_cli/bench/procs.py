"""What the services' processes cost while a bench runs: CPU seconds and memory per process (from
/proc, Linux only), Prometheus counters scraped before and after, and py-spy profiles."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from prometheus_client.parser import text_string_to_metric_families

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


# ---- /proc -----------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; everything after its closing parenthesis is fixed.
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time the process has used so far."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid` (e.g. the `milvus` process Milvus Lite starts)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        children = parents.get(pending.pop(), [])
        found.extend(children)
        pending.extend(children)
    return found


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def memory(pid: int) -> dict[str, float]:
    """Resident set size now and at its peak (VmHWM), in MiB."""
    values: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values["rss_mib" if key == "VmRSS" else "peak_rss_mib"] = round(int(rest.split()[0]) / 1024, 1)
    except OSError:
        pass
    return values


def milvus_lite_pid(db_path: Path, parent: int | None = None) -> int | None:
    """The `milvus` process serving a Milvus Lite file: its command line names the file."""
    wanted = str(db_path.resolve())
    candidates = descendants(parent) if parent is not None else [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    for pid in candidates:
        args = command_line(pid)
        if len(args) > 1 and Path(args[0]).name == "milvus" and args[1] == wanted:
            return pid
    return None


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot, all cores together: busy is what
    this system ran (user, nice, system, irq, softirq), stolen what the hypervisor gave others."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _CLOCK_TICKS, steal / _CLOCK_TICKS


@dataclass
class CpuMeter:
    """CPU seconds used per named process between `start()` and `stop()` (where the cores went during
    a measurement), and what the rest of the machine used meanwhile: on a shared box that is the
    noise in the figures."""

    pids: Mapping[str, int]
    _before: dict[str, float] = field(default_factory=dict)
    _machine_before: tuple[float, float] = (0.0, 0.0)
    machine: dict[str, float] = field(default_factory=dict)

    def _snapshot(self) -> dict[str, float]:
        snapshot = {}
        for name, pid in self.pids.items():
            seconds = own_cpu_seconds() if pid == os.getpid() else cpu_seconds(pid)
            if seconds is not None:
                snapshot[name] = seconds
        return snapshot

    def start(self) -> None:
        self._before = self._snapshot()
        self._machine_before = machine_cpu_seconds()

    def stop(self, wall_s: float) -> dict[str, dict[str, float]]:
        """Per process: CPU seconds and cores (CPU seconds / wall). Sets `machine`."""
        busy, stolen = machine_cpu_seconds()
        used = {}
        for name, seconds in self._snapshot().items():
            spent = seconds - self._before.get(name, seconds)
            used[name] = {"cpu_s": round(spent, 2), "cores": round(spent / wall_s, 2) if wall_s > 0 else 0.0}
        if wall_s > 0:
            busy_cores = (busy - self._machine_before[0]) / wall_s
            ours = sum(usage["cpu_s"] for usage in used.values()) / wall_s
            self.machine = {
                "busy_cores": round(busy_cores, 2),
                # Everything else on the machine (other people's tests, ...); clamped: counters tick coarsely.
                "other_processes_cores": round(max(0.0, busy_cores - ours), 2),
                "stolen_cores": round((stolen - self._machine_before[1]) / wall_s, 2),
            }
        return used


def child_named(pid: int, executable: str) -> int | None:
    """A descendant process running `executable` (e.g. the `milvus` that Milvus Lite starts)."""
    for child in descendants(pid):
        args = command_line(child)
        if args and Path(args[0]).name == executable:
            return child
    return None


def own_cpu_seconds() -> float:
    """This process's CPU time, including children it has reaped (e.g. Milvus Lite servers stopped)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# ---- Prometheus ------------------------------------------------------------------------------

def scrape(url: str, timeout_s: float = 5.0) -> dict[SampleKey, float]:
    """Every sample of a Prometheus text endpoint; empty when it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric_delta(before: Mapping[SampleKey, float], after: Mapping[SampleKey, float], name: str,
                 **labels: str) -> float:
    """How much a counter (or a histogram's _sum/_count) grew, summed over samples matching `labels`."""
    total = 0.0
    for (sample_name, sample_labels), value in after.items():
        if sample_name != name:
            continue
        label_map = dict(sample_labels)
        if all(label_map.get(key) == wanted for key, wanted in labels.items()):
            total += value - before.get((sample_name, sample_labels), 0.0)
    return total


def histogram_delta(before: Mapping[SampleKey, float], after: Mapping[SampleKey, float], name: str,
                    **labels: str) -> dict[str, float]:
    count = metric_delta(before, after, f"{name}_count", **labels)
    total = metric_delta(before, after, f"{name}_sum", **labels)
    return {"count": round(count), "sum": round(total, 4), "mean": round(total / count, 5) if count else 0.0}


# ---- py-spy ----------------------------------------------------------------------------------

def py_spy_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("py-spy")
    return str(beside_python) if beside_python.exists() else shutil.which("py-spy")


class PySpyProfiles:
    """Samples each named Python process with `py-spy record` (non-blocking, so the process is never
    paused) until `stop()`, then summarises the collapsed stacks it wrote. py-spy runs as this
    process's children, so a CpuMeter counts its CPU under this process once they are reaped."""

    def __init__(self, pids: Mapping[str, int], out_dir: Path, rate_hz: int = 100) -> None:
        self.pids = dict(pids)
        self.out_dir = out_dir
        self.rate_hz = rate_hz
        self._running: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.problems: list[str] = []

    def start(self) -> None:
        binary = py_spy_binary()
        if binary is None:
            self.problems.append("py-spy not installed (pip install py-spy)")
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            output = self.out_dir / f"profile-{name}.txt"
            log = open(self.out_dir / f"profile-{name}.log", "wb")
            process = subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--rate", str(self.rate_hz), "--format", "raw",
                 "--function", "--nonblocking", "--output", str(output)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            log.close()
            self._running[name] = (process, output)

    def stop(self, top: int = 12) -> dict[str, Any]:
        summaries: dict[str, Any] = {}
        for name, (process, output) in self._running.items():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if output.exists():
                summaries[name] = summarise_collapsed(output.read_text(), top) | {"file": str(output)}
            else:
                self.problems.append(f"py-spy wrote nothing for {name} (see {output.with_suffix('.log')})")
        self._running.clear()
        return summaries


def _frame_name(frame: str) -> str:
    """`func (path/to/file.py:12)` -> `func (file.py)`: one entry per function."""
    name, _, location = frame.partition(" (")
    location = location.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(location).name})" if location else name


# Innermost frames of threads that wait rather than work: py-spy's non-blocking mode cannot always
# tell, e.g. an event loop in epoll, an executor worker on its queue, gRPC's poller thread in C.
IDLE_LEAVES = frozenset({
    "EpollSelector.select (selectors.py)", "_PollLikeSelector.select (selectors.py)", "_worker (thread.py)",
    "Thread.run (threading.py)", "Condition.wait (threading.py)", "Event.wait (threading.py)",
    "Condition.__enter__ (threading.py)", "BaseServer.serve_forever (socketserver.py)",
})


def summarise_collapsed(text: str, top: int) -> dict[str, Any]:
    """Top functions of a py-spy raw (collapsed) profile, among busy samples (idle-looking innermost
    frames set apart): by self samples (the innermost frame, where the time is spent; C calls count in
    their Python caller) and by inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    busy = idle = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        if frames[-1] in IDLE_LEAVES:
            idle += count
            continue
        busy += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def ranked(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": frame, "samples": samples, "percent": round(100.0 * samples / busy, 1)}
                for frame, samples in counter.most_common(top)]

    return {"samples": busy, "idle_samples": idle, "top_self": ranked(own), "top_inclusive": ranked(inclusive)}
