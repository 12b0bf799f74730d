"""Run generated code (HumanEval completions) where it can do no harm: never in the evaluator's process.

Each program runs in a separate interpreter (`python -I -S`: no site-packages, no environment, so
no credentials) in a throwaway working folder and a session of its own, with limits on CPU time,
address space and file size, and is killed with its whole process group on timeout. Inside, an
audit hook installed before the program's first line refuses what a completion has no business
doing: starting processes (fork bombs included), opening sockets, loading native code through
ctypes, and writing, deleting or renaming anything outside the working folder. Audit hooks cannot
be removed once added (a program may add its own: it can only refuse more). In a cluster the
trainer pod (non-root, no capabilities, no service-account token) is the outer wall.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The guard runs first in the child; argv[1] is the working folder, the program is program.py in it.
_GUARD = r"""
import os, sys

ROOT = os.path.realpath(sys.argv[1])
REFUSED = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.kill", "os.killpg",
           "subprocess.Popen", "socket.__new__", "socket.connect", "socket.bind", "ctypes.dlopen", "ctypes.dlsym",
           "ctypes.cdata", "os.chdir", "os.setuid", "os.putenv"}
PATHS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
         "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    real = os.path.realpath(os.path.join(ROOT, path))
    return real == ROOT or real.startswith(ROOT + os.sep)


def guard(event, args):
    if event in REFUSED or (event == "import" and args[0] in ("ctypes", "_ctypes")):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args[0] is not None:
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITING
        if writes and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working folder")
    if event in PATHS and not all(inside(arg) for arg in args[:2] if isinstance(arg, (str, bytes, os.PathLike))):
        raise PermissionError(f"sandbox: {event} outside the working folder")


program = open(os.path.join(ROOT, "program.py")).read()
sys.addaudithook(guard)
namespace = {"__name__": "__main__"}
exec(compile(program, "program.py", "exec"), namespace)
"""


@dataclass(frozen=True)
class Outcome:
    """How one program ended: `passed` (exit 0), `failed` (an exception, a refused action), `timeout`."""

    status: str
    detail: str  # the end of its stderr, or why it was stopped

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_untrusted(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run `program` (Python source) in the sandbox; exit 0 is a pass."""
    with tempfile.TemporaryDirectory(prefix="potential-meme-sandbox-") as folder:
        Path(folder, "program.py").write_text(program)
        cpu_seconds = max(1, int(timeout) + 1)

        def limits() -> None:  # in the child, before exec
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
            resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
            resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", _GUARD, folder],
            cwd=folder,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=limits,
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome("timeout", f"still running after {timeout:g} s: killed")
        finally:
            _kill_group(process)  # on timeout, and anything it left behind in its session
        detail = stderr.decode(errors="replace")[-2000:]
        if process.returncode == 0:
            return Outcome("passed", detail)
        if process.returncode == -signal.SIGXCPU:
            return Outcome("timeout", f"used its {cpu_seconds} s of CPU time: killed")
        return Outcome("failed", detail or f"exit {process.returncode}")


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
