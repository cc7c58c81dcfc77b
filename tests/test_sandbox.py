"""The code-execution sandbox and the answer rules of the generation benchmarks."""

import os
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from compressor.answers import (
    GSM8K_STOPS, HUMANEVAL_STOPS, flexible_answer, gold_answer, humaneval_program, strict_answer, truncate,
)
from compressor.sandbox import os_sandbox_available, run_program

needs_bwrap = pytest.mark.skipif(not os_sandbox_available(), reason="bubblewrap is not available here")

PROBLEM = {  # shaped like a HumanEval record
    "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"Sum of a and b.\"\"\"\n",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def test_canonical_solution_passes_and_a_stub_fails():
    assert run_program(humaneval_program(PROBLEM, PROBLEM["canonical_solution"])).passed
    stub = run_program(humaneval_program(PROBLEM, "    pass\n"))
    assert stub.status == "failed" and "AssertionError" in stub.detail


def test_infinite_loop_is_killed_at_the_timeout():
    result = run_program("while True:\n    pass\n", timeout_s=1)
    assert result.status == "timeout" and result.seconds < 5


def test_memory_bomb_is_stopped():
    result = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 24))\n", memory_bytes=256 << 20)
    assert result.status in ("failed", "killed") and ("MemoryError" in result.detail or result.status == "killed")


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess\nsubprocess.run(['true'])\n",
    "import multiprocessing\n",
])
def test_process_creation_is_blocked(program):
    result = run_program(program, timeout_s=5)
    assert result.status == "failed"
    assert "disabled" in result.detail or "multiprocessing" in result.detail


def test_writes_outside_the_scratch_folder_and_network_are_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "outside the scratch folder" in result.detail
    assert not target.exists()
    assert run_program("open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'\n").passed
    network = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert network.status == "failed" and "disabled" in network.detail


def test_scratch_folder_is_deleted():
    result = run_program("import os\nprint(os.getcwd())\nassert os.getcwd().startswith(os.environ['TMPDIR'])\n")
    assert result.passed
    leftovers = [name for name in os.listdir(os.environ.get("TMPDIR", "/tmp")) if name.startswith("basis-sandbox-")]
    assert not leftovers


# What the Python guards miss, the OS-level sandbox must hold: each program below slips past
# them (the private _socket module, ctypes brought back, plain reads) and must still fail.
@needs_bwrap
def test_os_sandbox_holds_network_and_writes_that_bypass_the_python_guards(tmp_path):
    network = run_program("import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                          "s.settimeout(2)\ns.connect(('1.1.1.1', 80))\n")
    assert network.status == "failed" and "Network is unreachable" in network.detail  # ENETUNREACH: no route out
    target = tmp_path / "escaped.txt"
    escape = run_program("import os, sys\ndel sys.modules['ctypes']\nimport ctypes\n"
                         "libc = ctypes.CDLL(None)\n"
                         f"fd = libc.open({str(target).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
                         "assert fd >= 0, 'open failed'\n")
    assert escape.status == "failed" and not target.exists()


@needs_bwrap
def test_a_sandbox_that_cannot_start_is_an_error_not_a_failed_program(monkeypatch):
    import compressor.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_bwrap_command", lambda scratch: ["bwrap", "--no-such-option", "--"])
    with pytest.raises(sandbox.SandboxError, match="could not start the sandbox"):
        run_program("print(1)\n")


@needs_bwrap
def test_os_sandbox_hides_the_home_folder_and_other_files(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    read = run_program(f"print(open({str(secret)!r}).read())\n")
    assert read.status == "failed" and "No such file" in read.detail
    # Only the way to the Python installation shows in the home folder (pyenv, conda live there).
    shown = {Path(prefix).relative_to(Path.home()).parts[0] for prefix in (sys.prefix, sys.base_prefix)
             if Path(prefix).is_relative_to(Path.home())}
    home = run_program(f"import os\nprint(os.listdir({str(Path.home())!r}))\n"
                       f"assert set(os.listdir({str(Path.home())!r})) <= {shown!r}\n")
    assert home.passed, home.detail


@pytest.mark.parametrize("completion,strict,flexible", [
    ("She has 3 + 4 = 7 apples.\n#### 7", Decimal(7), Decimal(7)),
    ("It costs $1,234.50 in all.\n#### $1,234.50", Decimal("1234.50"), Decimal("1234.50")),
    ("The answer is 18.", None, Decimal(18)),
    ("#### -5\nThen 12 more", Decimal(-5), Decimal(12)),
    ("Half is .5 of it", None, Decimal("0.5")),
    ("no number here", None, None),
    ("#### 1,000,000.", Decimal(1000000), Decimal(1000000)),
])
def test_gsm8k_answer_extraction(completion, strict, flexible):
    assert strict_answer(completion) == strict
    assert flexible_answer(completion) == flexible


def test_gold_answers_and_stops():
    assert gold_answer("16 - 3 - 4 = <<16-3-4=9>>9\n#### 18") == Decimal(18)
    assert Decimal("18.0") == gold_answer("#### 18")  # 18.0 and 18 agree
    with pytest.raises(ValueError, match="without '#### N'"):
        gold_answer("just 18")
    assert truncate("x = 1\n#### 1\n\nQuestion: what is 2?", GSM8K_STOPS) == "x = 1\n#### 1"
    assert truncate("    return a + b\n\ndef other():\n    pass", HUMANEVAL_STOPS) == "    return a + b\n"
