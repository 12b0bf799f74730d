"""Generated code runs in the sandbox: what it must not do is contained, and it never runs in this process."""

import os
import time

import psutil
import pytest

from potential_meme.evaluation.sandbox import run_untrusted


def test_a_correct_program_passes_and_a_wrong_one_fails_with_its_error():
    assert run_untrusted("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n").passed
    wrong = run_untrusted("def add(a, b):\n    return a - b\nassert add(2, 3) == 5, 'add is wrong'\n")
    assert wrong.status == "failed" and "AssertionError: add is wrong" in wrong.detail


def test_an_infinite_loop_is_killed_on_time():
    started = time.monotonic()
    outcome = run_untrusted("while True:\n    pass\n", timeout=2)
    assert outcome.status == "timeout" and time.monotonic() - started < 6


def test_a_fork_bomb_starts_no_process():
    before = {p.pid for p in psutil.process_iter()}
    bomb = "import os\nwhile True:\n    os.fork()\n"
    outcome = run_untrusted(bomb, timeout=5)
    assert outcome.status == "failed" and "sandbox: os.fork is not allowed" in outcome.detail
    for escape in ("import subprocess\nsubprocess.run(['true'])\n", "import os\nos.system('true')\n"):
        assert run_untrusted(escape).status == "failed"
    assert not [p for p in psutil.process_iter() if p.pid not in before and p.ppid() == os.getpid()]


@pytest.mark.parametrize(
    "action",
    [
        "open(TARGET, 'w').write('escaped')",
        "import pathlib; pathlib.Path(TARGET).write_text('escaped')",
        "import os; fd = os.open(TARGET, os.O_WRONLY | os.O_CREAT); os.write(fd, b'escaped')",
        "import shutil; shutil.copyfile('program.py', TARGET)",
    ],
)
def test_a_file_written_outside_the_working_folder_is_refused(tmp_path, action):
    target = tmp_path / "outside.txt"
    outcome = run_untrusted(f"TARGET = {str(target)!r}\n{action}\n")
    assert outcome.status == "failed" and "outside the working folder" in outcome.detail
    assert not target.exists()
    # Its own folder is its scratch space.
    assert run_untrusted("open('scratch.txt', 'w').write('fine')\nassert open('scratch.txt').read() == 'fine'\n").passed


def test_files_outside_cannot_be_deleted_and_no_socket_or_native_code(tmp_path):
    kept = tmp_path / "kept.txt"
    kept.write_text("still here")
    assert run_untrusted(f"import os\nos.remove({str(kept)!r})\n").status == "failed"
    assert kept.read_text() == "still here"
    network = run_untrusted("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert "sandbox: socket.__new__ is not allowed" in network.detail
    assert "not allowed" in run_untrusted("import ctypes\n").detail


def test_no_credential_of_this_process_reaches_it(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_for_generated_code")
    assert run_untrusted("import os\nassert 'HF_TOKEN' not in os.environ, dict(os.environ)\n").passed


def test_memory_is_capped():
    outcome = run_untrusted("block = bytearray(4 << 30)\n", memory_mb=512)
    assert outcome.status == "failed" and "MemoryError" in outcome.detail
