"""Read a local process's memory and CPU from /proc (Linux), and find who listens on a port."""

from __future__ import annotations

import os
import timeit


def rss_kb(pid: int) -> int | None:
    """Resident set size of ``pid`` in KiB (VmRSS), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User+system CPU seconds ``pid`` has used, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may hold spaces: fields start after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        ppid = int(raw[raw.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid`` and its live descendants (a server's relay workers, say)."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(cpu_seconds(c) or 0.0 for c in descendants(pid))


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = [int(x) for x in fields]
    # user nice system idle iowait irq softirq steal ...
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK


def cpu_speed_ms(repeat: int = 5, number: int = 20) -> float:
    """Milliseconds one core takes for ``sum(range(100_000))`` right now (best of ``repeat``).

    The VMs these figures come from ran it anywhere between 0.8 and 1.7 ms within one
    benchmark: a report carries it (before and after the run) as a gauge of the machine's
    speed then. It sees the interpreter, not system calls or scheduling.
    """
    timer = timeit.Timer("sum(range(100_000))")
    return round(min(timer.repeat(repeat, number)) / number * 1000, 3)


def cpu_pressure_us() -> int | None:
    """Total microseconds some runnable task waited for a CPU (Linux PSI), if available."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some "):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def listen_overflows() -> int | None:
    """Times a listen queue overflowed on this host (TcpExt ListenOverflows), if readable."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.readlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            value = table.get("ListenOverflows")
            return int(value) if value is not None else None
    return None


def listening_pid(port: int) -> int | None:
    """The PID of the local process listening on TCP ``port`` (needs /proc access), or None."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    local, state, inode = cols[1], cols[3], cols[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except OSError:
            continue
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                if os.readlink(f"/proc/{name}/fd/{fd}") in targets:
                    return int(name)
        except OSError:
            continue
    return None
