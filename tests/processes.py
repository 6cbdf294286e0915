"""Reading Linux processes from /proc, for tests that watch the engine process."""

from __future__ import annotations

from pathlib import Path


def stat_fields(path: str | Path) -> list[str]:
    """The fields of a /proc ``stat`` file after the command name: state, ppid, ...,
    nice at [16] (the name, in parentheses, may hold spaces)."""
    return Path(path).read_text().rsplit(") ", 1)[1].split()


def exited(pid: int) -> bool:
    """Whether ``pid`` has ended (gone, or a zombie its parent has not reaped yet)."""
    try:
        return stat_fields(f"/proc/{pid}/stat")[0] == "Z"
    except FileNotFoundError:
        return True


def engine_process_of(parent_pid: int) -> int:
    """The PID of the engine process that ``parent_pid`` (a model replica) started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(stat_fields(entry / "stat")[1])
            cmdline = (entry / "cmdline").read_text().split("\0")
        except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            continue
        if ppid == parent_pid and "deployments.engine_process" in cmdline:
            return int(entry.name)
    raise AssertionError(f"process {parent_pid} has no engine process")
