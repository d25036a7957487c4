"""The sandbox launcher: runs as its own process, builds the jail, runs one program.

``sandbox.py`` starts this file as ``python -I -S _launcher.py`` with a JSON
config on stdin. It imports only the standard library (it must start fast and
must not depend on the harness's import path) and never runs untrusted code
itself. Three processes take part, in this order::

    harness ── L (this file, host namespaces) ── P1 (pid 1 of a new PID namespace) ── G (the program)

* **L** (launcher) sets ``PR_SET_PDEATHSIG`` so it dies with the harness, creates
  new user, mount, PID, network, IPC and UTS namespaces with one ``unshare``,
  forks P1 and enforces the wall-clock timeout by killing P1. Killing P1 makes
  the kernel SIGKILL every process left in the PID namespace (fork storms,
  daemonised children, processes that called ``setsid``), and ``waitpid(P1)``
  returns only once the namespace is empty, so "the whole program is gone" is
  a kernel guarantee rather than a ``ps`` sweep.
* **P1** (trusted init) dies with L (``PR_SET_PDEATHSIG``), makes the whole
  filesystem read-only, mounts a private ``/tmp``, ``/dev``, ``/proc`` and
  ``/run``, writes the program into ``/tmp``, forks G, reaps orphans, and
  reports G's exit status, CPU time and peak RSS to the harness. Signals sent
  from inside the namespace cannot kill it: a PID namespace's init ignores
  signals whose disposition is the default (``pid_namespaces(7)``).
* **G** sets the rlimits, gives up every capability (and, when the harness is
  root, the uid: it runs as an unprivileged uid mapped to ``nobody``), sets
  ``no_new_privs`` and execs the interpreter.

The network namespace has only a loopback interface that is down, so any
connection fails. ``RLIMIT_NPROC`` is counted per user namespace
(kernel ucounts), so it bounds each sandbox separately and is enforced even
when the harness runs as root, because the program holds no capability in the
initial user namespace.

Fallback ``mode == "rlimits"``: no namespaces (they are not available); the
program runs in its own session with the same rlimits in a host temporary
directory. It has the network and can write wherever the harness user can.
``sandbox.py`` only uses it when the caller opted in explicitly.

Events go to the harness on a report pipe as JSON lines; the program's own
verdict channel (for ``check_program``) is fd 3 of the program.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Callable

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# <linux/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
SYS_mount_setattr = 442  # the same number on every architecture (new syscalls share one table since 5.1)
# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# <linux/securebits.h>: root gets no capabilities on exec, and that cannot be undone.
SECBITS_LOCKED_NOROOT = (
    0x1 | 0x2 | 0x4 | 0x8
)  # NOROOT, NOROOT_LOCKED, NO_SETUID_FIXUP, NO_SETUID_FIXUP_LOCKED
LINUX_CAPABILITY_VERSION_3 = 0x20080522

SANDBOX_UID = 1000  # the program's uid inside the user namespace when the harness is root
NOBODY = 65534  # what SANDBOX_UID maps to outside: the overflow uid/gid, which owns nothing
WORKDIR = "/tmp"  # inside the jail: a private, size-limited tmpfs
# Directories the jail replaces with private tmpfs mounts (WORKDIR first).
PRIVATE_DIRS = (WORKDIR, "/var/tmp", "/dev/shm", "/run")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


class SetupError(Exception):
    """A step of building the jail failed; reported to the harness as an 'error' event."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})")


def _prctl(option: int, arg: int = 0, what: str = "prctl") -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), what)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _set_mount_attrs(path: str, attrs: int, recursive: bool, clear: int = 0) -> None:
    attr = _MountAttr(attr_set=attrs, attr_clr=clear)
    flags = AT_RECURSIVE if recursive else 0
    ret = _libc.syscall(
        SYS_mount_setattr, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    if ret == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        _check(ret, f"mount_setattr {path}")
    # Kernels before 5.12: remount every mount under `path` one by one. Flags the
    # kernel locked (nosuid/nodev/noexec set before the namespace existed) must be
    # repeated or the remount fails with EPERM, so carry over what statvfs reports.
    for mnt in _mounts_under(path) if recursive else [path]:
        try:
            st = os.statvfs(mnt)
        except OSError:
            continue
        keep = st.f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        flags = (keep | _attrs_to_ms(attrs)) & ~_attrs_to_ms(clear)
        _mount(None, mnt, None, MS_REMOUNT | MS_BIND | flags)


def _attrs_to_ms(attrs: int) -> int:
    return (
        (MS_RDONLY if attrs & MOUNT_ATTR_RDONLY else 0)
        | (MS_NOSUID if attrs & MOUNT_ATTR_NOSUID else 0)
        | (MS_NODEV if attrs & MOUNT_ATTR_NODEV else 0)
    )


def _mounts_under(path: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")  # mountinfo octal-escapes spaces
            if mnt == path or mnt.startswith(path.rstrip("/") + "/"):
                out.append(mnt)
    return out


class Report:
    """JSON-lines events to the harness. Only trusted code (L, P1, G before exec) writes here."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, **event) -> None:
        try:
            os.write(self.fd, (json.dumps(event) + "\n").encode())
        except OSError:
            pass  # the harness is gone; nothing left to tell


# ---------------------------------------------------------------- capabilities


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 63


def drop_bounding_set(last_cap: int) -> None:
    """Empty the bounding and ambient sets and lock "root gets no capabilities".

    The bounding set matters most: a uid-0 process that execs gets every
    capability in its bounding set back (capabilities(7), "Capabilities and
    execution of programs by root"), so clearing only the effective set would
    undo itself at execve. Needs CAP_SETPCAP, so it runs before the uid change.
    """
    try:
        _prctl(PR_SET_SECUREBITS, SECBITS_LOCKED_NOROOT, "securebits")
    except SetupError:
        pass  # the empty bounding set below is what guarantees it
    for cap in range(last_cap + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            _check(-1, f"drop capability {cap}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (always allowed: it only lowers)."""
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


# ---------------------------------------------------------------- L: launcher


def main() -> None:
    cfg = json.loads(sys.stdin.buffer.read())
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    report = Report(cfg["report_fd"])
    os.set_inheritable(cfg["report_fd"], False)  # never survives G's execve
    # Die with the harness. The check after prctl closes the race where the
    # harness died between our fork and the prctl.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != cfg["parent_pid"]:
        os._exit(1)
    try:
        if cfg["mode"] == "namespaces":
            launch_namespaced(cfg, report)
        else:
            launch_rlimits(cfg, report)
    except SetupError as e:
        report.send(event="error", message=str(e))
        os._exit(1)
    os._exit(0)


def launch_namespaced(cfg: dict, report: Report) -> None:
    root = os.geteuid() == 0
    helper = _fork_map_writer() if root else None
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        if helper is not None:
            os.kill(helper[0], signal.SIGKILL)
            os.waitpid(helper[0], 0)
        report.send(event="unavailable", message=f"unshare: {os.strerror(err)}")
        os._exit(1)
    if root:
        _finish_map_writer(helper)
    else:
        _write_own_maps()

    alive_r, alive_w = os.pipe()  # P1 sees EOF on alive_r if L is already dead
    os.set_inheritable(alive_w, False)
    pid1 = os.fork()
    if pid1 == 0:
        os.close(alive_w)
        try:
            init_main(cfg, report, root, alive_r)
        except SetupError as e:
            report.send(event="error", message=str(e))
        except BaseException as e:  # never let a bug in P1 return into L's code
            report.send(event="error", message=f"sandbox init: {type(e).__name__}: {e}")
        os._exit(1)
    os.close(alive_r)
    _detach_stdio(cfg)
    _wait_with_timeout(pid1, cfg["timeout"], report)


def _fork_map_writer() -> tuple[int, int]:
    """Fork a helper that stays in the initial user namespace.

    Only a process with CAP_SETUID in the *parent* user namespace may write a
    uid_map with more than the caller's own uid (user_namespaces(7)); after
    unshare(CLONE_NEWUSER) L has lost that, so a child forked before the
    unshare writes the maps for it (what newuidmap does for unprivileged users).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        target = os.getppid()
        ok = os.read(r, 1) == b"1"
        if not ok:
            os._exit(1)
        try:
            # ns uid 0 -> root: P1 needs it to set up mounts; ns uid 1000 -> nobody: the program.
            with open(f"/proc/{target}/uid_map", "w") as f:
                f.write(f"0 0 1\n{SANDBOX_UID} {NOBODY} 1\n")
            with open(f"/proc/{target}/gid_map", "w") as f:
                f.write(f"0 0 1\n{SANDBOX_UID} {NOBODY} 1\n")
        except OSError:
            os._exit(2)
        os._exit(0)
    os.close(r)
    return pid, w


def _finish_map_writer(helper: tuple[int, int]) -> None:
    pid, w = helper
    os.write(w, b"1")
    os.close(w)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SetupError("could not write the user namespace's uid/gid maps")


def _write_own_maps() -> None:
    # Unprivileged: the only mapping allowed is our own uid/gid, and setgroups must be denied first.
    uid, gid = os.geteuid(), os.getegid()
    try:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1\n")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1\n")
    except OSError as e:
        raise SetupError(f"write uid/gid map: {e.strerror}") from None


def _detach_stdio(cfg: dict) -> None:
    """L keeps no copy of the program's output pipes, so the harness sees EOF when the jail is gone."""
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        os.close(cfg["result_fd"])
    except OSError:
        pass


def _wait_with_timeout(pid: int, timeout: float, report: Report) -> None:
    deadline = time.monotonic() + timeout
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pass
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)  # P1 dies -> the kernel kills the whole PID namespace
            _, status = os.waitpid(pid, 0)  # returns once every process in it is gone
            break
        if pidfd is not None:
            select.select([pidfd], [], [], left)
        else:
            time.sleep(min(left, 0.01))
    if timed_out:
        report.send(event="timeout")
    elif os.WIFSIGNALED(status):
        report.send(event="init_killed", signal=os.WTERMSIG(status))


# ---------------------------------------------------------------- P1: init of the PID namespace


def init_main(cfg: dict, report: Report, root: bool, alive_r: int) -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    poller = select.poll()
    poller.register(alive_r, select.POLLIN)
    if poller.poll(0):  # EOF or data: L died before we armed PDEATHSIG
        os._exit(1)
    os.set_inheritable(alive_r, False)
    # Python installs handlers for SIGINT and ignores SIGPIPE/SIGXFSZ; with
    # default dispositions the kernel drops those signals when they come from
    # inside the namespace, so the program cannot kill its init.
    for sig in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace or /proc/1/mem access from the program
    os.umask(0o022)  # the program (another uid when the harness is root) must read the files we write
    last_cap = _last_cap()
    setup_filesystem(cfg, root)
    _libc.sethostname(b"sandbox", 7)  # best effort: the UTS namespace is ours
    stdin_fd = _stdin_fd(cfg.get("stdin", ""), WORKDIR)
    _write_files(WORKDIR, cfg["files"])
    start = time.monotonic()
    pid = _start_program(cfg, report, stdin_fd, lambda keep: program_main(cfg, root, last_cap, stdin_fd, keep))
    # Reap everything (orphans are re-parented to us) until G itself exits.
    while True:
        try:
            got, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        if got == pid:
            report.send(**_exit_event(status, usage, start))
            break
    os._exit(0)  # init exits: the kernel SIGKILLs whatever the program left behind


def _stdin_fd(data: str, directory: str) -> int:
    """An unlinked file in ``directory``, so a large stdin cannot dead-lock a pipe and leaves no trace."""
    if not data:
        return os.open("/dev/null", os.O_RDONLY)
    path = os.path.join(directory, ".stdin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data.encode("utf-8"))
    os.lseek(fd, 0, os.SEEK_SET)
    os.unlink(path)
    return fd


def _write_files(directory: str, files: dict[str, str]) -> None:
    """The program and the files it needs, by their relative names (sandbox.py checked them)."""
    for name, text in files.items():
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def _start_program(cfg: dict, report: Report, stdin_fd: int, run: Callable[[set[int]], None]) -> int:
    """Fork the program's process and return its pid once it has exec'd.

    ``run(keep_fds)`` runs in the child: it sets the process up and execs, keeping the
    fds it is given open. Whatever fails before the exec comes back through a
    close-on-exec pipe, which reaches EOF at a successful execve, and is raised here as
    SetupError (the program never ran, so it is not the program's failure). The child
    owns ``stdin_fd`` from here on; this process keeps no copy of it or of the
    program's output."""
    exec_err_r, exec_err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(exec_err_r)
        try:
            run({report.fd, exec_err_w})
        except BaseException as e:
            os.write(exec_err_w, f"{type(e).__name__}: {e}".encode())
        os._exit(127)
    os.close(exec_err_w)
    os.close(stdin_fd)
    _detach_stdio(cfg)
    exec_error = b""
    while chunk := os.read(exec_err_r, 4096):  # EOF at the successful execve (CLOEXEC)
        exec_error += chunk
    os.close(exec_err_r)
    if exec_error:
        os.waitpid(pid, 0)
        raise SetupError(f"could not start the program: {exec_error.decode(errors='replace')}")
    return pid


def _exit_event(status: int, usage: resource.struct_rusage, start: float) -> dict:
    """The "exit" report of the program from its wait status and rusage."""
    return {
        "event": "exit",
        "returncode": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "max_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "elapsed": time.monotonic() - start,
    }


def setup_filesystem(cfg: dict, root: bool) -> None:
    """Read-only view of the host, with private writable /tmp, /var/tmp, /dev/shm and /run."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    dev_fds = {}
    for name in ("null", "zero", "full", "random", "urandom"):
        try:
            dev_fds[name] = os.open(f"/dev/{name}", os.O_PATH)
        except OSError:
            pass
    expose = [p for p in cfg.get("expose", []) if os.path.isdir(p)]
    # An exposed directory inside one that gets a private tmpfs below (a venv under /tmp)
    # would vanish with it: hold it open now and bind it back read-only afterwards.
    private = [p for p in expose if _under_private(p)]
    private_fds = [(p, os.open(p, os.O_PATH)) for p in _outermost(private)]
    masks = _plan_masks([p for p in expose if p not in private]) if root else {}
    mask_fds = {a: [(p, os.open(p, os.O_PATH)) for p in paths] for a, paths in masks.items()}

    _set_mount_attrs("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive=True)

    # The program runs as `nobody` when the harness is root; directories such as
    # /root (0700) would hide the interpreter from it. Cover each with an empty
    # tmpfs and bind back only the interpreter's own directories, which also
    # hides everything else in that home directory.
    for mask, entries in mask_fds.items():
        _mount("tmpfs", mask, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
        for path, fd in entries:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            _set_mount_attrs(path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive=True)
            os.close(fd)
        _set_mount_attrs(mask, MOUNT_ATTR_RDONLY, recursive=False)

    # A fresh /dev with only the harmless character devices: the host /dev
    # holds disks that uid 0 could open for writing even on a read-only mount.
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    for name, fd in dev_fds.items():
        target = f"/dev/{name}"
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o666))
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
        _set_mount_attrs(
            target, MOUNT_ATTR_NOSUID, recursive=False, clear=MOUNT_ATTR_NODEV | MOUNT_ATTR_RDONLY
        )
        os.close(fd)
    for link, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"/dev/{link}")
    os.mkdir("/dev/shm", 0o1777)
    os.chmod("/dev/shm", 0o1777)
    _set_mount_attrs("/dev", MOUNT_ATTR_RDONLY, recursive=False)

    # /proc of the new PID namespace: the program sees only its own processes.
    # Read-only so that a uid-0 program cannot write /proc/sys.
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    except SetupError:
        # Some container runtimes forbid a new procfs ("mount_too_revealing");
        # the host's stays read-only and its processes are in another PID
        # namespace, out of reach of kill().
        pass

    tmp_opts = f"mode=1777,size={int(cfg['limits']['tmp_bytes'])},nr_inodes=4096"
    _mount("tmpfs", WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts)
    for extra in PRIVATE_DIRS[1:]:
        # /run holds daemons' unix sockets (docker, dbus): reachable by path even from a
        # network namespace, so hide them.
        if os.path.isdir(extra) and not os.path.islink(extra):
            _mount("tmpfs", extra, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=1m,nr_inodes=256")
    for path, fd in private_fds:
        # Parents are made 0755 on the fresh tmpfs, so `nobody` can walk to the interpreter even
        # where the host's were 0700 (mkdtemp); nothing else of the host directory comes back.
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _set_mount_attrs(path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, recursive=True)
        os.close(fd)


def _under_private(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in PRIVATE_DIRS)


def _outermost(paths: list[str]) -> list[str]:
    """The paths not inside another of them (one bind covers what is below it)."""
    kept: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == k or p.startswith(k + "/") for k in kept):
            kept.append(p)
    return kept


def _plan_masks(expose: list[str]) -> dict[str, list[str]]:
    """For each path the program must reach, the topmost ancestor `nobody` cannot traverse."""
    masks: dict[str, list[str]] = {}
    for path in sorted(set(expose)):
        if not os.path.isdir(path):
            continue
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:i])
            try:
                mode = os.stat(ancestor).st_mode
            except OSError:
                break
            if not mode & 0o001:
                masks.setdefault(ancestor, []).append(path)
                break
    # A path inside another exposed path is covered by the outer bind.
    masks = {mask: _outermost(paths) for mask, paths in masks.items()}
    # Nested masks (/root and /root/x) collapse into the outer one.
    return {m: p for m, p in masks.items() if not any(m.startswith(o + "/") for o in masks)}


# ---------------------------------------------------------------- G: the program


def _set_limits(limits: dict) -> None:
    cpu = int(limits["cpu_seconds"])
    pairs = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # soft: SIGXCPU, hard: SIGKILL
        (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (limits["file_size_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if limits.get("max_processes"):
        pairs.append((resource.RLIMIT_NPROC, (limits["max_processes"],) * 2))
    for which, value in pairs:
        resource.setrlimit(which, value)


def program_main(cfg: dict, root: bool, last_cap: int, stdin_fd: int, keep_fds: set[int]) -> None:
    os.setsid()  # its own session and process group inside the namespace
    _set_limits(cfg["limits"])
    if root:
        os.setgroups([])
        os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        drop_bounding_set(last_cap)
        os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    else:
        drop_bounding_set(last_cap)
    clear_capabilities()
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    os.chdir(WORKDIR)
    _exec_program(cfg, stdin_fd, keep_fds)


def _exec_program(cfg: dict, stdin_fd: int, keep_fds: set[int]) -> None:
    os.dup2(stdin_fd, 0)
    os.dup2(cfg["result_fd"], 3)  # the verdict channel check_program's driver writes to
    keep = {0, 1, 2, 3} | keep_fds
    for fd in _open_fds():
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    os.set_inheritable(3, True)
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def _open_fds() -> list[int]:
    try:
        return [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


# ---------------------------------------------------------------- fallback: rlimits only


def launch_rlimits(cfg: dict, report: Report) -> None:
    """No namespaces: own session, rlimits, temp cwd. The harness kills the session on timeout."""
    workdir = cfg["workdir"]
    stdin_fd = _stdin_fd(cfg.get("stdin", ""), workdir)
    _write_files(workdir, cfg["files"])

    def run(keep_fds: set[int]) -> None:
        os.setsid()  # a process group the launcher can kill as a whole
        _set_limits(cfg["limits"])
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.chdir(workdir)
        _exec_program(cfg, stdin_fd, keep_fds)

    start = time.monotonic()
    pid = _start_program(cfg, report, stdin_fd, run)
    deadline = start + cfg["timeout"]
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got:
            break
        if time.monotonic() >= deadline:
            os.killpg(pid, signal.SIGKILL)  # the program's session; children that setsid() escape this
            os.wait4(pid, 0)
            report.send(event="timeout")
            return
        time.sleep(0.005)
    report.send(**_exit_event(status, usage, start))
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever it left behind in its session
    except OSError:
        pass


if __name__ == "__main__":
    main()
