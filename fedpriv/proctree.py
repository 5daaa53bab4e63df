"""Process trees from /proc (Linux): a process's state, its descendants, their memory."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

# (state, ppid, pgid, start time in clock ticks)
Stat = tuple[str, int, int, int]


def proc_stat(pid: int) -> Optional[Stat]:
    """(state, ppid, pgid, start time in clock ticks) from /proc, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    rest = text[text.rfind(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[2]), int(rest[19])


def pid_alive(pid: int, start: Optional[int] = None) -> bool:
    """True if ``pid`` runs (zombies count as gone) and, if given, started at ``start``."""
    st = proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return start is None or st[3] == start


def process_table() -> dict[int, Stat]:
    """Every process's :func:`proc_stat`, by PID."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None:
                table[int(entry)] = st
    return table


def _children(table: dict[int, Stat]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    return children


def subtree(root: int) -> list[int]:
    """``root`` and every process below it by parent PID (zombies included)."""
    children, out, todo = _children(process_table()), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def descendants(roots: dict[int, int]) -> set[int]:
    """Every live process below ``roots`` (``pid -> start time``), by parent PID or by process group.

    A root that already exited still counts: the members of its process group (started after it)
    are found by group id, and so are the members of any group a descendant leads (Flower's
    SuperLink starts its SuperExec in a new session).
    """
    table = process_table()
    children = _children(table)
    found: set[int] = set()
    todo = [r for r, start in roots.items() if r in table and table[r][3] == start]
    groups = dict(roots)  # group id -> start time of its leader
    while True:
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                if child not in found and child not in roots:
                    found.add(child)
                    todo.append(child)
        for pid in found:
            if table[pid][2] == pid:
                groups.setdefault(pid, table[pid][3])
        members = {
            pid for pid, st in table.items()
            if st[2] in groups and st[3] >= groups[st[2]] and pid not in roots and pid not in found
        }
        if not members:
            break
        found |= members
        todo = list(members)
    return {p for p in found if table[p][0] not in ("Z", "X")}


def _kib(pid: int, field: str, filename: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{filename}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    """The process's resident set (``VmRSS``) in KiB; 0 if it is gone."""
    return _kib(pid, "VmRSS", "status")


def pss_kib(pid: int) -> int:
    """The process's proportional set (``Pss``: shared pages divided among their sharers) in KiB; 0 if it is gone."""
    return _kib(pid, "Pss", "smaps_rollup")


def cpu_ticks(pid: int) -> Optional[int]:
    """CPU time the process has used (user + system, in clock ticks), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2 :].split()
    return int(rest[11]) + int(rest[12])


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces ('' if it is gone). A process that
    renames itself shows its title here: a Ray actor's worker reads ``ray::ClientAppActor`` when
    idle and ``ray::ClientAppActor.run`` while it runs a task."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kill_all(pids: Iterable[int], sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to each of ``pids`` that still runs; returns those it reached."""
    reached = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            reached.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return reached
