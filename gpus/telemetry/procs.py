"""Process helpers shared by the backends: pid namespace mapping, process trees, names."""

from __future__ import annotations

import os

import psutil

MIB = 1024 * 1024


def nspid_map(proc_root: str = "/proc") -> dict[int, int]:
    """Map pids seen from other pid namespaces to pids in ours, from /proc/<pid>/status NSpid lines.

    NSpid lists the pid from the namespace of this /proc (ours) down to the process's own
    namespace. Only processes with more than one field are included. When values collide, a pid
    that is one of our own (a first field) keeps pointing at itself.
    """
    mapping: dict[int, int] = {}
    local: dict[int, int] = {}
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = _read_nspid(os.path.join(proc_root, entry, "status"))
        if len(fields) < 2:
            continue
        ours = fields[0]
        local[ours] = ours
        for other in fields[1:]:
            mapping.setdefault(other, ours)
    mapping.update(local)
    return mapping


def _read_nspid(status_path: str) -> list[int]:
    try:
        with open(status_path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(v) for v in line.split()[1:] if v.isdigit()]
    except OSError:
        pass
    return []


def process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return "?"


def process_tree_pids(pid: int) -> set[int]:
    """The pid plus all its descendants; empty set if the pid is gone."""
    try:
        proc = psutil.Process(pid)
        children = proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return set()
    except psutil.AccessDenied:
        return {pid}
    return {pid, *(child.pid for child in children)}


def parse_cuda_visible_devices(value: str | None) -> list[str]:
    """Tokens of a CUDA_VISIBLE_DEVICES value ("0,1" or "GPU-uuid,..."), blanks dropped."""
    if not value:
        return []
    return [token.strip() for token in value.split(",") if token.strip()]


def cuda_visible_devices_by_pid(proc_root: str = "/proc") -> dict[int, list[str]]:
    """CUDA_VISIBLE_DEVICES tokens of every readable process that sets it.

    Reads /proc/<pid>/environ raw and only parses the one variable: several times faster than
    psutil's environ() dicts, which matters when this runs for every sample. Falls back to psutil
    where there is no /proc.
    """
    if not os.path.isdir(proc_root):
        return _cuda_visible_devices_psutil()
    key = b"CUDA_VISIBLE_DEVICES="
    found: dict[int, list[str]] = {}
    for entry in os.listdir(proc_root):
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc_root, entry, "environ"), "rb") as f:
                data = f.read()
        except OSError:  # gone, or another user's process
            continue
        if key not in data:
            continue
        for item in data.split(b"\0"):
            if item.startswith(key):
                tokens = parse_cuda_visible_devices(item[len(key) :].decode("utf-8", "replace"))
                if tokens:
                    found[int(entry)] = tokens
                break
    return found


def _cuda_visible_devices_psutil() -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for proc in psutil.process_iter():
        try:
            tokens = parse_cuda_visible_devices(proc.environ().get("CUDA_VISIBLE_DEVICES"))
        except (psutil.Error, OSError):
            continue
        if tokens:
            found[proc.pid] = tokens
    return found


def _parent_map(proc_root: str = "/proc") -> dict[int, list[int]]:
    """parent pid -> child pids, from one pass over /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc_root, entry, "stat"), "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: the fields after its last ")" are plain.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_trees(pids: list[int], proc_root: str = "/proc") -> dict[int, set[int]]:
    """Each live pid with all its descendants, from ONE scan of the process table (a refresh asks for
    many trees at once; psutil's children() rescans every process for each)."""
    if not pids:
        return {}
    if not os.path.isdir(proc_root):
        return {pid: process_tree_pids(pid) for pid in pids}
    children = _parent_map(proc_root)
    trees = {}
    for root in pids:
        if not os.path.exists(os.path.join(proc_root, str(root))):
            trees[root] = set()
            continue
        tree, stack = {root}, [root]
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in tree:
                    tree.add(child)
                    stack.append(child)
        trees[root] = tree
    return trees
