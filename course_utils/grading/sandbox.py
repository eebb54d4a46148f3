"""Limits for the process that runs a student's notebook (the grader's plumbing, no lesson).

The grader starts each submission's kernel through ``python -m course_utils.grading.sandbox``, which
applies the limits below to itself and then becomes the kernel (``exec``): nothing the submission
runs can lift them. What is enforced, and where:

- **memory** (``RLIMIT_AS``), **CPU time** (``RLIMIT_CPU``), **file size** (``RLIMIT_FSIZE``, with
  ``SIGXFSZ`` ignored so that an over-large write fails in the cell instead of killing the kernel)
  and **open files**: POSIX resource limits, on Linux and macOS;
- **processes** (``RLIMIT_NPROC``, threads included): Linux counts every process of the user and
  exempts root, so a grader running as root starts the kernel as the unprivileged user ``nobody``
  (its fresh working folder handed over to it); a normal user's limit is what it already runs plus
  the allowance;
- **files**: Linux Landlock (kernel 5.13 or later): read-only access to Python, the installed
  libraries, the system's libraries, the course package, ``data/`` and ``configs/``; read and
  write access to a fresh temporary working folder; nothing else, so ``solutions/``, the other
  students' notebooks and the home folders cannot be read;
- **network**: Landlock ABI 4 (Linux 6.7 or later): no outgoing TCP connection, TCP ``bind``
  only on the kernel's own five ports (the grader talks to it through them). UDP is not covered;
- **environment**: an allow-list of variables (no tokens, no cloud credentials); ``HOME`` and
  ``TMPDIR`` point into the working folder.

Where the OS cannot enforce one (macOS has no Landlock; an older Linux lacks the network part),
``sandbox.json`` in the working folder says so, and the grader's report carries it.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from course_utils.course.paths import DATA_DIR, REPO_ROOT

NOBODY = 65534
#: What a kernel reads in /etc (the rest, /etc/shadow included, stays closed).
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf",
             "/etc/hosts", "/etc/ssl", "/etc/mime.types", "/etc/matplotlibrc", "/etc/fonts")
#: Environment variables a kernel keeps; everything else (tokens, credentials) is dropped.
KEPT_VARIABLES = ("PATH", "LANG", "LC_ALL", "TZ", "COURSE_PROFILE", "COURSE_GRADER_SEED",
                  "MPLBACKEND", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED",
                  "VIRTUAL_ENV")


@dataclass(frozen=True)
class Limits:
    """What one submission may use. The defaults suit the exercises on a 2-core laptop."""

    memory_mb: int = 8192        # address space of the kernel (torch alone maps ~1.5 GB)
    cpu_seconds: int = 1200      # CPU time of the kernel over the whole notebook
    processes: int = 128         # processes and threads the kernel may add (its own ~20 included)
    file_mb: int = 64            # the largest file it may write
    open_files: int = 256

    @classmethod
    def from_json(cls, text: str) -> Limits:
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def clean_environment(workdir: Path, extra: dict[str, str]) -> dict[str, str]:
    """The kernel's environment: the allow-list, a home and temp folder inside ``workdir``."""
    env = {name: os.environ[name] for name in KEPT_VARIABLES if name in os.environ}
    env.update(extra)
    env.update(HOME=str(workdir), TMPDIR=str(workdir), MPLCONFIGDIR=str(workdir / ".matplotlib"),
               PYTHONDONTWRITEBYTECODE="1", JUPYTER_RUNTIME_DIR=str(workdir / ".jupyter"),
               IPYTHONDIR=str(workdir / ".ipython"))
    return env


# --- Landlock (Linux): see linux/landlock.h --------------------------------------------------------

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_WRITE_DIR_RIGHTS = sum(1 << bit for bit in range(4, 13))  # remove, make dir/file/sock/fifo/link
_REFER, _TRUNCATE = 1 << 13, 1 << 14
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_PR_SET_NO_NEW_PRIVS = 38


class _PathRule(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _PortRule(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where there is none (not Linux, too old, disabled)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    version = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(version), 0)


def readable_paths() -> list[Path]:
    """What a kernel must read: Python, its libraries, the system's, and the course's own files."""
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable),
                  os.path.dirname(os.path.realpath(sys.executable)), "/usr", "/lib", "/lib64",
                  "/bin", "/proc", "/sys", "/opt", *ETC_FILES, REPO_ROOT / "course_utils", DATA_DIR,
                  REPO_ROOT / "configs"]
    candidates += [entry for entry in sys.path if entry and Path(entry).is_dir()]
    paths = []
    for candidate in candidates:
        path = Path(candidate).resolve()
        # the repository itself would open solutions/: only its package, data and configs
        if path.exists() and path != REPO_ROOT and path not in paths:
            paths.append(path)
    return paths


def apply_landlock(workdir: Path, kernel_ports: list[int]) -> dict[str, bool]:
    """Confine this process and its children to ``readable_paths()`` (read-only) and ``workdir``
    and ``/dev`` (read-write); with ABI 4+, TCP only for binding the kernel's ports."""
    abi = landlock_abi()
    if abi < 1:
        return {"files": False, "network": False}
    libc = ctypes.CDLL(None, use_errno=True)
    read = _EXECUTE | _READ_FILE | _READ_DIR
    write = _WRITE_FILE | _WRITE_DIR_RIGHTS | (_REFER if abi >= 2 else 0) | (_TRUNCATE if abi >= 3 else 0)
    handled_fs = read | write
    handled_net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    attr = (ctypes.c_uint64 * 2)(handled_fs, handled_net)
    size = 16 if abi >= 4 else 8
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        return {"files": False, "network": False}

    def allow(path: Path, access: int) -> None:
        fd = os.open(str(path), os.O_PATH | os.O_CLOEXEC)
        try:
            rights = access if path.is_dir() else access & (_EXECUTE | _READ_FILE | _WRITE_FILE
                                                            | (_TRUNCATE if abi >= 3 else 0))
            rule = _PathRule(rights, fd)
            if libc.syscall(_SYS_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule({path})")
        finally:
            os.close(fd)

    # listing the repository's folders (not reading its files) lets Python's importer find the
    # course package
    allow(REPO_ROOT, _READ_DIR)
    for path in readable_paths():
        allow(path, read)
    for path in (workdir, Path("/dev")):
        allow(path, read | write)
    if handled_net:
        for port in [*kernel_ports, 0]:  # 0: an ephemeral port, for ipykernel's internal pipe
            rule = _PortRule(_NET_BIND_TCP, port)
            if libc.syscall(_SYS_ADD_RULE, ruleset, 2, ctypes.byref(rule), 0) != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule(port {port})")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    return {"files": True, "network": bool(handled_net)}


def stray_processes(group: int) -> list[int]:
    """Processes in the process group ``group`` other than its leader (Linux: from ``/proc``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        if int(fields[2]) == group and pid != group:
            found.append(pid)
    return found


def kill_strays(group: int) -> int:
    """Kill what a kernel started and left running (a fork bomb's children); return how many."""
    strays = stray_processes(group)
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(strays)


# --- the launcher ---------------------------------------------------------------------------------

def user_process_count(uid: int) -> int:
    """Processes and threads the user ``uid`` runs now (Linux: from ``/proc``)."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1").strip())
    return count


_PR_SET_KEEPCAPS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 8, 47, 2
_CAP_DAC_READ_SEARCH = 2
_CAPABILITY_VERSION_3 = 0x20080522


def drop_to_nobody(workdir: Path) -> bool:
    """As root, with Landlock available: hand ``workdir`` to ``nobody`` and become ``nobody``, so
    that the process limit applies (Linux exempts root from it). ``nobody`` keeps one capability,
    reading and listing any folder (Python may be installed under ``/root``); Landlock, applied
    next, narrows that to the allowed paths. False when not root or without Landlock."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or landlock_abi() < 1:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    for folder, _, files in os.walk(workdir):
        os.chown(folder, NOBODY, NOBODY)
        for name in files:
            os.chown(os.path.join(folder, name), NOBODY, NOBODY)
    libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    bit = 1 << _CAP_DAC_READ_SEARCH
    data = (ctypes.c_uint32 * 6)(bit, bit, bit, 0, 0, 0)  # effective, permitted, inheritable x2
    if libc.syscall(126 if os.uname().machine == "x86_64" else 91, ctypes.byref(header),
                    ctypes.byref(data)) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAP_AMBIENT_RAISE)")
    return True


def can_run_as_nobody(workdir: Path) -> bool:
    """Whether this machine lets a child become ``nobody`` and still start Python (a container
    may forbid ``setuid`` or capabilities): tried in a throw-away child first, since there is no
    way back once done."""
    if not hasattr(os, "fork") or os.geteuid() != 0 or landlock_abi() < 1:
        return False
    child = os.fork()
    if child == 0:
        try:
            drop_to_nobody(workdir)
            os.execv(sys.executable, [sys.executable, "-c", "pass"])
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def set_limits(limits: Limits, already: int) -> None:
    """Apply ``limits`` to this process; ``already``: processes its user runs now (the process
    limit counts them all, so each kernel gets its allowance on top)."""
    mb = 1024 * 1024
    wanted = [(resource.RLIMIT_AS, limits.memory_mb * mb, limits.memory_mb * mb),
              (resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 5),
              (resource.RLIMIT_FSIZE, limits.file_mb * mb, limits.file_mb * mb),
              (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files)]
    if hasattr(resource, "RLIMIT_NPROC") and sys.platform.startswith("linux"):
        wanted.append((resource.RLIMIT_NPROC, already + limits.processes, already + limits.processes))
    for which, soft, hard in wanted:
        try:
            resource.setrlimit(which, (soft, hard))
        except (ValueError, OSError):  # e.g. macOS refuses RLIMIT_AS: the report shows it
            pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails, the kernel lives


def main(argv=None) -> None:
    """``python -m course_utils.grading.sandbox LIMITS_JSON WORKDIR CONNECTION_FILE [COMMAND...]``: confine
    this process, then become an IPython kernel on ``CONNECTION_FILE`` (or run ``COMMAND``, which
    the tests use to try the limits without a kernel)."""
    argv = argv or sys.argv[1:]
    limits_json, workdir, connection_file = argv[:3]
    command = argv[3:]
    workdir = Path(workdir).resolve()
    limits = Limits.from_json(limits_json)
    connection = json.loads(Path(connection_file).read_text())
    ports = [connection[k] for k in ("shell_port", "iopub_port", "stdin_port", "control_port",
                                     "hb_port")]
    private_copy = workdir / ".jupyter" / "kernel.json"  # readable after dropping privileges
    private_copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(connection_file, private_copy)
    nobody_already = user_process_count(NOBODY) if sys.platform.startswith("linux") else 0
    as_nobody = can_run_as_nobody(workdir) and drop_to_nobody(workdir)
    set_limits(limits, nobody_already if as_nobody else user_process_count(os.getuid()))
    try:
        confined = apply_landlock(workdir, ports)
    except OSError as error:
        if as_nobody:  # nobody's capability without Landlock would read everything: refuse
            raise
        confined = {"files": False, "network": False, "error": str(error)}
    os.chdir(workdir)
    def applied(which, unit=1):  # read back: what the OS accepted, None where it refused
        soft = resource.getrlimit(which)[0]
        return None if soft == resource.RLIM_INFINITY else soft // unit

    enforced = {"memory_mb": applied(resource.RLIMIT_AS, 1024 * 1024),
                "cpu_seconds": applied(resource.RLIMIT_CPU),
                "file_mb": applied(resource.RLIMIT_FSIZE, 1024 * 1024), "processes": limits.processes,
                "process_limit_applies": as_nobody or os.getuid() != 0,
                "runs_as": "nobody" if as_nobody else str(os.getuid()),
                "files_confined": confined["files"], "network_confined": confined["network"],
                "environment": sorted(os.environ)}
    (workdir / "sandbox.json").write_text(json.dumps(enforced))
    command = command or [sys.executable, "-m", "ipykernel_launcher", "-f", str(private_copy)]
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
