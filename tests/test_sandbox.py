"""The sandbox for generated code, for real: containment, limits, and HumanEval on top of it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest

from blockdiff.eval import humaneval, sandbox
from blockdiff.eval.sandbox import SandboxError, run_python


def _no_namespaces() -> str | None:
    """Why this machine cannot host the sandbox at all (then its tests skip), or None."""
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return "unshare/setpriv (util-linux) not installed"
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    r = subprocess.run(["unshare", "--net", "--mount", "--pid", "--fork", *user, "true"], capture_output=True)
    return f"namespaces unavailable: {r.stderr.decode().strip()}" if r.returncode else None


REASON = _no_namespaces()
needs_sandbox = pytest.mark.skipif(REASON is not None, reason=f"no sandbox on this machine: {REASON}")


@needs_sandbox
def test_normal_program_passes_with_stdout():
    r = run_python("import sys\nprint('hello', sum(range(10)))\nprint('err', file=sys.stderr)\n")
    assert (r.status, r.returncode, r.stdout, r.stderr) == ("passed", 0, "hello 45\n", "err\n")


@needs_sandbox
def test_writes_outside_the_work_dir_are_contained(tmp_path):
    targets = [tmp_path / "escaped.txt", f"/tmp/{uuid.uuid4().hex}"]
    for target in targets:
        r = run_python(f"open({str(target)!r}, 'w').write('pwned')\n")
        assert r.status == "failed" and "Error" in r.stderr
        assert not os.path.exists(target)
    r = run_python("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n")
    assert r.status == "passed" and r.stdout == "ok\n"


@needs_sandbox
def test_no_network():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'x')\n"
        r = run_python(code, timeout=5)
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert r.status == "failed" and "OSError" in r.stderr


@needs_sandbox
@pytest.mark.parametrize("code", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_timeout(code):
    t0 = time.monotonic()
    r = run_python(code, timeout=1.5)
    assert r.status == "timeout"
    assert time.monotonic() - t0 < 1.5 + 3


@needs_sandbox
def test_memory_hog_fails():
    r = run_python("x = bytearray(4 << 30)\nprint('allocated')\n", memory_mb=512)
    assert r.status == "failed" and "allocated" not in r.stdout and "MemoryError" in r.stderr


def test_missing_unshare_refuses_to_run(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "UNSHARE", "blockdiff-no-such-unshare")
    marker = tmp_path / "ran"
    with pytest.raises(SandboxError, match="refuses to execute generated code"):
        run_python(f"open({str(marker)!r}, 'w')\n")
    assert not marker.exists()


@needs_sandbox
def test_humaneval_canonical_passes_and_wrong_fails():
    problems = humaneval.load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    for p in problems[:3]:
        assert humaneval.passes(p, p["canonical_solution"])
        assert not humaneval.passes(p, "    return None\n")


def test_truncate_cuts_at_top_level_stops():
    body = "    x = 1\n    # an indented comment stays\n    return x\n"
    assert humaneval.truncate(body + "\ndef helper():\n    pass\n") == body
    assert humaneval.truncate(body + "\nif __name__ == '__main__':\n    main()\n") == body
    assert humaneval.truncate(body) == body
