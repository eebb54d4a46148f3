"""The limits a submission runs under (issue 23): each bomb costs its own question, the grader and
the machine go on, and the kernel reads no secrets, no solutions and no network.

A throw-away exercise with one probe per limit is graded with limits small enough for CI; each
bomb's question is followed by an ordinary one that must still pass.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile

import pytest

from course_utils.grading import grade, sandbox
from course_utils.grading.make_exercises import SOLUTIONS_DIR

ANSWERS = '''
import os
import socket
import time


def add(a, b):
    ### BEGIN SOLUTION
    return a + b
    ### END SOLUTION


def secret():
    return os.environ.get("HF_TOKEN")


def read_file(path):
    try:
        with open(path) as file:
            file.read(1)
        return "read"
    except OSError:
        return "denied"


def connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return "connected"
    except OSError:
        return "blocked"


def memory_bomb():
    return len(bytearray(16 * 2**30))


def fork_bomb():
    while True:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)


def big_file():
    with open("big.bin", "wb") as file:
        file.write(b"0" * (32 * 2**20))
    return "written"


def crash():
    os._exit(3)
'''


def probe_exercise(folder, port: int):
    """``folder/ex99_limits.ipynb``: the answers above and one graded test cell per probe."""
    solution = str(SOLUTIONS_DIR / "ex08_dpo.ipynb")
    tests = {
        "q_environment_has_no_token": "assert secret() is None",
        "q_solutions_are_unreadable": f"assert read_file({solution!r}) == 'denied'",
        "q_no_network": f"assert connect({port}) == 'blocked'",
        "q_memory_bomb": "assert memory_bomb() > 0",
        "q_after_memory_bomb": "assert add(2, 3) == 5",
        "q_fork_bomb": "assert fork_bomb()",
        "q_after_fork_bomb": "assert add(2, 3) == 5",
        "q_huge_file": "assert big_file() == 'written'",
        "q_after_huge_file": "assert add(2, 3) == 5",
        "q_crash": "assert crash()",
        "q_after_crash": "assert add(2, 3) == 5",
    }
    cells = [{"cell_type": "code", "metadata": {}, "source": ANSWERS, "outputs": [],
              "execution_count": None}]
    cells += [{"cell_type": "code", "source": source, "outputs": [], "execution_count": None,
               "metadata": {"course": {"grade_id": grade_id, "points": 1, "hint": "a probe"}}}
              for grade_id, source in tests.items()]
    notebook = {"cells": cells, "metadata": {"course": {"exercise": "ex99_limits"}},
                "nbformat": 4, "nbformat_minor": 5}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ex99_limits.ipynb"
    path.write_text(json.dumps(notebook))
    return path, tests


def nobody_processes_in(folder: str) -> list[int]:
    """Processes of ``nobody`` working in ``folder`` (a kernel's temp folder, even once deleted):
    this test's kernels and what they forked, not those of tests grading beside it."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry.path).st_uid == sandbox.NOBODY and os.readlink(
                    f"{entry.path}/cwd").startswith(folder):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the limits are Linux's")
def test_every_bomb_costs_only_its_question(tmp_path, monkeypatch, request):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    monkeypatch.setenv("HF_TOKEN", "hf_secret_of_the_instructor")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "also_secret")
    path, tests = probe_exercise(tmp_path / "solutions", port)
    work = tempfile.mkdtemp(prefix="sandbox-test-")  # the kernels' temp folders go in here
    os.chmod(work, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", work)
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    limits = sandbox.Limits(memory_mb=2048, cpu_seconds=120, processes=48, file_mb=8)
    report: dict = {}
    try:
        results = grade.grade_notebook(path, solutions_dir=tmp_path / "solutions", timeout_s=30,
                                       seed=3, limits=limits, report=report)
    finally:
        listener.close()
    points = {r.question: r.points for r in results}
    enforced = report["sandbox"]
    expected = {grade_id: 0.0 if grade_id in ("q_memory_bomb", "q_fork_bomb", "q_huge_file", "q_crash")
                else 1.0 for grade_id in tests}
    if not enforced["files_confined"]:
        expected["q_solutions_are_unreadable"] = 0.0
    if not enforced["network_confined"]:
        expected["q_no_network"] = 0.0
    assert points == expected, [(r.question, r.status, r.message) for r in results]
    assert "HF_TOKEN" not in enforced["environment"]
    assert "AWS_SECRET_ACCESS_KEY" not in enforced["environment"]
    assert nobody_processes_in(work) == []  # the fork bomb's children are gone
    if sandbox.landlock_abi() >= 1:  # what this Linux can enforce, it does
        assert enforced["files_confined"] and enforced["process_limit_applies"]
    if sandbox.landlock_abi() >= 4:
        assert enforced["network_confined"]


def test_the_kernels_environment_is_an_allow_list(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    monkeypatch.setenv("PATH", os.environ.get("PATH", "/usr/bin"))
    env = sandbox.clean_environment(tmp_path, {"COURSE_PROFILE": "tiny"})
    assert "HF_TOKEN" not in env and "OPENAI_API_KEY" not in env
    assert env["HOME"] == str(tmp_path) and env["TMPDIR"] == str(tmp_path)
    assert env["COURSE_PROFILE"] == "tiny" and env["PATH"]
