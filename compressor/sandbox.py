"""Run untrusted generated code (HumanEval completions) in a limited child process.

Each program runs in a fresh `python -I` child, in a new session, in a scratch folder that is
deleted afterwards, with:
- a wall-clock timeout (the whole process group is killed) and a CPU-time limit;
- an address-space limit (a memory bomb gets MemoryError or is killed);
- a process limit, and process creation disabled in Python (fork, spawn, subprocess,
  multiprocessing): RLIMIT_NPROC alone does not bind root;
- no network: socket creation is disabled;
- writes only inside the scratch folder (open / os.open refuse any other path for writing)
  and a file-size limit.
Where bubblewrap (`bwrap`, Debian package bubblewrap) works, the child also runs in an OS-level
sandbox that holds whatever the Python guards miss (ctypes, os-level calls): a read-only view of
the file system, an empty private /tmp and home, the scratch folder the only writable place,
and no network, no view of other processes (new user, network, PID, IPC and UTS namespaces).
Without it the child runs with the Python guards alone, which stop accidents of generated code,
not a determined attacker; a warning says so once per process. Nothing runs unless the caller
opts in (compressor eval --allow-code-exec).
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Installed in the child before the program runs; the program arrives on stdin.
_GUARD = r"""
import builtins, os, resource, socket, subprocess, sys
# The process limit is set here, not before exec: under bubblewrap it would also bind bwrap,
# whose namespace set-up counts every task of the real user and then fails.
resource.setrlimit(resource.RLIMIT_NPROC, (int(sys.argv[1]), int(sys.argv[1])))
sys.stderr.write("<sandbox started>\n")  # tells a program's own failure from a sandbox that never ran
sys.stderr.flush()
program = sys.stdin.read()
scratch = os.path.realpath(os.getcwd())

def _inside(path):
    try:
        full = os.path.realpath(os.fspath(path) if not isinstance(path, int) else scratch)
    except TypeError:
        return False
    return full == scratch or full.startswith(scratch + os.sep)

_open, _os_open = builtins.open, os.open
def guarded_open(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and not _inside(file):
        raise PermissionError(f"sandbox: writing outside the scratch folder is not allowed: {file}")
    return _open(file, mode, *args, **kwargs)
def guarded_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and not _inside(path):
        raise PermissionError(f"sandbox: writing outside the scratch folder is not allowed: {path}")
    return _os_open(path, flags, *args, **kwargs)
def refused(*args, **kwargs):
    raise PermissionError("sandbox: this operation is disabled")

builtins.open = guarded_open
os.open = guarded_os_open
for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execvp", "execvpe", "execl",
             "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
             "posix_spawnp", "kill", "killpg", "remove", "unlink", "rmdir", "removedirs", "rename",
             "renames", "replace", "chmod", "chown", "truncate", "putenv", "setuid", "chdir"):
    if hasattr(os, name):
        setattr(os, name, refused)
subprocess.Popen = refused
socket.socket = refused
socket.create_connection = refused
sys.modules["multiprocessing"] = None
sys.modules["ctypes"] = None
exec(compile(program, "<generated>", "exec"), {"__name__": "__main__"})
"""


@dataclass
class Execution:
    status: str  # passed | failed | timeout | killed
    detail: str  # the end of stderr, or why it was killed
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


STARTED = "<sandbox started>\n"


class SandboxError(RuntimeError):
    pass


def _limit(memory_bytes: int, cpu_seconds: int, file_bytes: int):
    def apply() -> None:  # runs in the child between fork and exec (the process limit: in _GUARD)
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def _bwrap_command(scratch: str) -> list[str]:
    """bubblewrap's wrapping: / read-only, private /tmp and home folders (the Python installation
    shown again), the scratch folder writable, every namespace new (no network), the child dies
    with its parent."""
    hidden = sorted({str(Path.home()), "/root", "/home"} - {scratch})
    command = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for folder in hidden:
        if os.path.isdir(folder) and not scratch.startswith(folder + os.sep):
            command += ["--tmpfs", folder]
    # The interpreter may live under a hidden home (pyenv, conda): shown again, read-only.
    for needed in sorted({sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}):
        command += ["--ro-bind", needed, needed]
    return command + ["--bind", scratch, scratch, "--chdir", scratch, "--unshare-all", "--die-with-parent",
                      "--new-session", "--"]


@functools.lru_cache(maxsize=1)
def os_sandbox_available() -> bool:
    """Whether bubblewrap is installed and allowed to make namespaces here (probed once)."""
    if shutil.which("bwrap") is None:
        log.warning("No OS-level sandbox: bubblewrap (bwrap) is not installed, so generated code runs with "
                    "Python-level guards only, which stop accidents, not an attacker. Install it "
                    "(apt install bubblewrap) or run evaluations of untrusted models in a container.")
        return False
    scratch = tempfile.mkdtemp(prefix="basis-sandbox-probe-")
    try:
        probe = subprocess.run([*_bwrap_command(scratch), "/bin/true"], capture_output=True, text=True, timeout=30,
                               preexec_fn=_limit(1 << 30, 30, 16 << 20))  # as the programs will run
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if probe.returncode != 0:
        log.warning("No OS-level sandbox: bubblewrap cannot create namespaces here (%s); generated code runs "
                    "with Python-level guards only.", probe.stderr.strip()[-200:])
    return probe.returncode == 0


def run_program(program: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30,
                max_processes: int = 64, file_bytes: int = 16 << 20) -> Execution:
    """Run `program` (Python source) in the sandbox; passed means it exited 0."""
    scratch = tempfile.mkdtemp(prefix="basis-sandbox-")
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    command = [sys.executable, "-I", "-c", _GUARD, str(max_processes)]
    wrapped = os_sandbox_available()
    if wrapped:
        command = _bwrap_command(scratch) + command
    process = subprocess.Popen(command, cwd=scratch, env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True, preexec_fn=_limit(memory_bytes, int(timeout_s) + 1, file_bytes))
    try:
        _, stderr = process.communicate(program, timeout=timeout_s)
        started = stderr.startswith(STARTED)
        stderr = stderr[len(STARTED):] if started else stderr
        if wrapped and not started and process.returncode > 0:
            # The sandbox did not start: scoring that as a failed program would read as pass@1 0.
            raise SandboxError(f"bubblewrap could not start the sandbox ({stderr.strip()[:300]}); fix its setup "
                               "(user namespaces) or uninstall it to run with the Python-level guards.")
        status = "passed" if process.returncode == 0 else "failed"
        if process.returncode < 0:
            status, stderr = "killed", f"killed by signal {-process.returncode} (a resource limit)\n{stderr}"
    except subprocess.TimeoutExpired:
        status, stderr = "timeout", f"no result within {timeout_s:g} s"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the child and anything it managed to start
        except ProcessLookupError:
            pass
        process.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    return Execution(status, stderr[-2000:], time.perf_counter() - start)
