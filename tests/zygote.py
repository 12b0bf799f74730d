"""Start `potential-meme` commands as forks of one process that has already imported the engine.

A trainer process spends about 8 s of this machine's time importing torch and transformers before
it reads its job, and the suite starts well over a hundred of them (CLI runs, trainer pods). A fork
of a process that has done those imports starts in milliseconds. The child is a process of its own:
own pid and session, its own environment, working directory and standard streams, signals and an
exit status as the kernel reports them, running the same `potential_meme.cli.main` the console
script runs. Only the interpreter's start-up is shared, as with multiprocessing's forkserver.

Not for what must prove a fresh interpreter: the operator (which must never import torch), the
console script's own entry point, torchrun's workers (torchrun starts those itself).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

# What a trainer, evaluation or launcher touches before its first step, lazily loaded modules included.
PRELOADED = (
    "potential_meme.cli",
    "potential_meme.launch",
    "potential_meme.engine.trainer",
    "potential_meme.engine.evaluation",
    "potential_meme.storage",
    "torch.distributed.run",
    "transformers.models.llama.modeling_llama",
    "transformers.models.llama.configuration_llama",
    "transformers.tokenization_utils_fast",
    "boto3",
    "botocore.session",
)


def serve(path: str) -> None:
    """The zygote: import, listen on a Unix socket, fork one child a request, report each child's exit."""
    for name in PRELOADED:
        importlib.import_module(name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(64)
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the selector
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    selector.register(wakeup_read, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)  # closed when the test session ends
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in selector.select():
            if key.fileobj is sys.stdin:
                if not sys.stdin.readline():
                    return
            elif key.fileobj is server:
                connection, _ = server.accept()
                message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
                pid = os.fork()
                if pid == 0:
                    _become(json.loads(message), fds, [server, connection], wakeup_read, wakeup_write)
                for fd in fds:
                    os.close(fd)
                connection.send(str(pid).encode())
                children[pid] = connection
            else:
                os.read(wakeup_read, 4096)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid)
            try:
                connection.send(str(os.waitstatus_to_exitcode(status)).encode())
            except OSError:
                pass  # its client is gone
            connection.close()


def _become(request: dict, fds: list[int], sockets: list[socket.socket], *pipe: int) -> None:
    """In the child: the process the request describes, then its exit; never returns to the zygote's loop."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for held in sockets:
            held.close()
        for fd in pipe:
            os.close(fd)
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if request["script"]:  # a Python file run as __main__, as `python SCRIPT ARGV...`
            sys.argv = [request["script"], *request["argv"]]
            runpy.run_path(request["script"], run_name="__main__")
            code = 0
        else:
            sys.argv = ["potential-meme", *request["argv"]]
            from potential_meme.cli import main

            code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - what an interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        try:
            for thread in threading.enumerate():
                if thread is not threading.current_thread() and not thread.daemon:
                    thread.join()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class Forked:
    """A command forked by the zygote, with what the tests use of a `subprocess.Popen`."""

    def __init__(self, connection: socket.socket, args: list[str], stdout=None):
        self.args = args
        self.stdout = stdout
        self.pid = int(connection.recv(64))
        self.returncode: int | None = None
        self._connection = connection
        self._exited = threading.Event()
        threading.Thread(target=self._await_exit, daemon=True).start()

    def _await_exit(self) -> None:
        message = self._connection.recv(64)
        self._connection.close()
        self.returncode = int(message) if message else -signal.SIGKILL  # the zygote died with it
        self._exited.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """All of `stdout` (a pipe holding both streams), then the exit, as Popen's does."""
        output = read_until_closed(self.stdout, timeout, self.args)
        self.wait(timeout)
        return output, None

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass  # the zygote has reaped it and its exit status is on the way, as Popen ignores it too

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def read_until_closed(stream, timeout: float | None, args: list[str]) -> str:
    """Everything written to a pipe until every writer has closed it, or TimeoutExpired."""
    output = []
    reader = threading.Thread(target=lambda: output.append(stream.read()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        raise subprocess.TimeoutExpired(args, timeout)
    return output[0]


class Zygote:
    def __init__(self, environment: dict[str, str]):
        self._folder = tempfile.TemporaryDirectory(prefix="zygote-")
        self._path = str(Path(self._folder.name) / "socket")
        self._process = subprocess.Popen(
            [sys.executable, __file__, self._path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment
        )
        if self._process.stdout.readline() != b"ready\n":
            raise RuntimeError(f"the zygote did not start (exit {self._process.wait()})")

    def start(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str | Path,
        stdout: int,
        stderr: int,
        script: Path | None = None,
    ) -> Forked:
        """`potential-meme ARGV` (or `python SCRIPT ARGV`) with these output and error descriptors, stdin empty."""
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        connection.connect(self._path)
        with open(os.devnull) as stdin:
            request = {"argv": argv, "env": env, "cwd": str(cwd), "script": str(script) if script else None}
            socket.send_fds(connection, [json.dumps(request).encode()], [stdin.fileno(), stdout, stderr])
        return Forked(connection, [str(script) if script else "potential-meme", *argv])

    def stop(self) -> None:
        self._process.stdin.close()
        self._process.wait(30)
        self._folder.cleanup()


_running: Zygote | None = None
_starting = threading.Lock()


def zygote(environment: dict[str, str]) -> Zygote:
    """The session's zygote, started on first use with the environment its imports should see."""
    global _running
    with _starting:
        if _running is None:
            _running = Zygote(environment)
            atexit.register(_running.stop)
    return _running


if __name__ == "__main__":
    serve(sys.argv[1])
