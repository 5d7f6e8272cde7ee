"""Run untrusted generated Python in a throwaway Linux sandbox, or refuse to run it at all.

Generated code is a program nobody has read, so it never runs in our process or with our rights.
`run_python` starts it under `unshare` in fresh network, mount, PID, IPC and UTS namespaces (no
network at all, no view of other processes); a small init makes every mount read-only except an
empty temporary work directory, sets rlimits (CPU, address space, file size, processes, no core
dumps) and runs the code through `setpriv` with no capabilities, no_new_privs and, when we are
root, as nobody (65534). If any of that cannot be set up, `SandboxError` is raised: nothing runs
unsandboxed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

from ..config import BlockdiffError

UNSHARE = "unshare"  # executables, looked up on PATH per run (tests point these at missing names)
SETPRIV = "setpriv"
NOBODY = 65534
NPROC = 64  # per-uid process limit; stops fork bombs, leaves room for parallel sandboxes
KEEP = 4096  # characters of stdout / stderr kept
SETUP_TIMEOUT = 30.0  # seconds the namespaces and mounts may take before the code starts

# Init, run as PID 1 of the new namespaces with `-I -S -c`. Reports on fd `cfg["fd"]`: "ok" once
# contained, then "exit N" (N < 0: killed by signal -N); "error ..." if setup failed.
_INIT = r"""
import ctypes, errno, json, os, re, resource, sys
cfg = json.loads(sys.argv[1]); fd, work = cfg["fd"], cfg["work"]
libc = ctypes.CDLL(None, use_errno=True)
BIND, REC, RO, REMOUNT, PRIVATE = 4096, 16384, 1, 32, 1 << 18
KEEP_FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8}
def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)):
        e = ctypes.get_errno()
        raise OSError(e, f"mount {dst}: {os.strerror(e)}")
def mounts():
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        yield re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), f[4]), f[5].split(",")
def blocked(p):  # topmost ancestor of p that nobody may not traverse
    parts = p.strip("/").split("/")[:-1]
    for i in range(len(parts)):
        a = "/" + "/".join(parts[: i + 1])
        if not os.stat(a).st_mode & 1:
            return a
try:
    mount(None, "/", None, REC | PRIVATE)
    tops = {p: blocked(p) for p in cfg["expose"]}
    binds = {p: os.open(p, os.O_PATH) for p in dict.fromkeys([work] + [p for p in tops if tops[p]])}
    for a in {a for a in tops.values() if a}:  # hide e.g. /root, show only what is needed
        mount("tmpfs", a, "tmpfs", 2 | 4, "mode=755")
    for p, pfd in binds.items():
        os.makedirs(p, exist_ok=True)
        mount(f"/proc/self/fd/{pfd}", p, None, BIND | REC)
        os.close(pfd)
    for mp, opts in list(mounts()):
        if mp == work:
            continue
        flags = REMOUNT | BIND | RO | sum(v for k, v in KEEP_FLAGS.items() if k in opts)
        try:
            mount(None, mp, None, flags)
        except OSError as e:
            if e.errno != errno.ENOENT and "ro" not in opts:
                raise
    left = {mp for mp, _ in mounts() if mp != work and os.path.exists(mp)}  # statvfs: the top mount
    left = [mp for mp in left if not os.statvfs(mp).f_flag & os.ST_RDONLY]
    if left:
        raise RuntimeError(f"still writable: {left}")
    os.chdir(work)  # the writable bind mount, not the read-only one below it
except Exception as e:
    os.write(fd, f"error {type(e).__name__}: {e}\n".encode())
    os._exit(97)
os.write(fd, b"ok\n")
pid = os.fork()
if pid == 0:
    try:
        os.close(fd)
        for lim, val in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, lim), tuple(val))
        os.execv(cfg["argv"][0], cfg["argv"])
    finally:
        os._exit(127)
os.write(fd, f"exit {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}\n".encode())
"""


class SandboxError(BlockdiffError, RuntimeError):
    """The sandbox could not be set up; the generated code was not run."""

    def __init__(self, why: str):
        super().__init__(
            f"{why}. blockdiff refuses to execute generated code without its sandbox, which needs "
            "Linux with `unshare` and `setpriv` (util-linux) and namespaces: run as root, or "
            "enable unprivileged user namespaces (kernel.unprivileged_userns_clone=1)"
        )


@dataclass
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None  # negative: killed by that signal; None: killed at the wall-clock timeout
    stdout: str
    stderr: str
    seconds: float


def _clip(f) -> str:
    f.seek(0)
    data = f.read().decode(errors="replace")
    if len(data) <= KEEP:
        return data
    return f"{data[: KEEP // 2]}\n...[{len(data) - KEEP} characters cut]...\n{data[-KEEP // 2 :]}"


def _interpreter_dirs() -> list[str]:
    """Directories the interpreter needs (it may live under /root, which nobody cannot enter)."""
    dirs = {os.path.dirname(os.path.realpath(sys.executable))}
    dirs |= {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return sorted(d for d in dirs if not any(d.startswith(o + "/") for o in dirs))


def _rmtree(work: str) -> None:
    """Remove the work dir; unprivileged, first undo any `chmod 000` the code left behind."""
    if os.geteuid() != 0:
        with contextlib.suppress(OSError):
            os.chmod(work, 0o700)
            for d, subdirs, _ in os.walk(work):  # top-down: each subdir is opened before it is walked
                for p in (os.path.join(d, s) for s in subdirs):
                    if not os.path.islink(p):
                        os.chmod(p, 0o700)
    shutil.rmtree(work, ignore_errors=True)


def _run(code: str, timeout: float, memory_mb: int, file_size_mb: int) -> SandboxResult:
    unshare, setpriv = shutil.which(UNSHARE), shutil.which(SETPRIV)
    if not unshare or not setpriv:
        raise SandboxError(f"'{UNSHARE}' or '{SETPRIV}' was not found on PATH")
    root = os.geteuid() == 0
    work = os.path.realpath(tempfile.mkdtemp(prefix="blockdiff-sandbox-"))
    with open(os.path.join(work, "main.py"), "w") as f:
        f.write(code)
    drop = ["--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
    if root:
        os.chown(work, NOBODY, NOBODY)
        drop += [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    cpu, mb = max(1, math.ceil(timeout)), 1 << 20
    r, w = os.pipe()
    cfg = {
        "fd": w,
        "work": work,
        "expose": [*_interpreter_dirs(), work] if root else [],
        "argv": [setpriv, *drop, "--", sys.executable, "-I", "main.py"],
        "rlimits": {
            "RLIMIT_CPU": [cpu, cpu + 1],
            "RLIMIT_AS": [memory_mb * mb] * 2,
            "RLIMIT_FSIZE": [file_size_mb * mb] * 2,
            "RLIMIT_NPROC": [NPROC] * 2,
            "RLIMIT_CORE": [0, 0],
        },
    }
    ns = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts"]
    cmd = [unshare, *ns, *([] if root else ["--user", "--map-root-user"])]
    cmd += [sys.executable, "-I", "-S", "-c", _INIT, json.dumps(cfg)]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LC_ALL": "C.UTF-8"}
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # bounded by RLIMIT_FSIZE
    report, timed_out, p = b"", False, None
    try:
        p = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(w,), cwd=work,
            env=env, start_new_session=True,
        )  # fmt: skip
        os.close(w)
        w = -1
        deadline = time.monotonic() + SETUP_TIMEOUT
        while b"\n" not in report and select.select([r], [], [], max(0, deadline - time.monotonic()))[0]:
            if not (chunk := os.read(r, 4096)):
                break
            report += chunk
        start = time.monotonic()
        if report.startswith(b"ok\n"):
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
        seconds = time.monotonic() - start
    finally:
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # unshare --kill-child then takes the namespace down
            p.wait()
        while select.select([r], [], [], 0)[0] and (chunk := os.read(r, 4096)):
            report += chunk
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        _rmtree(work)
    lines = report.decode(errors="replace").splitlines()
    if not lines or lines[0] != "ok":
        why = lines[0] if lines else f"unshare exited {p.returncode}: {_clip(err).strip()[-500:]}"
        raise SandboxError(f"sandbox setup failed ({why})")
    code_rc = int(lines[-1].split()[1]) if lines[-1].startswith("exit ") else None
    if timed_out or code_rc == -signal.SIGXCPU:
        status = "timeout"
    else:
        status = "passed" if code_rc == 0 else "failed"
    return SandboxResult(status, None if timed_out else code_rc, _clip(out), _clip(err), seconds)


@functools.cache
def check_sandbox() -> None:
    """Prove, once per process, that sandboxed code cannot write outside its directory."""
    target = os.path.join(tempfile.gettempdir(), f"blockdiff-escape-{uuid.uuid4().hex}")
    probe = (
        "import os\nopen('inside', 'w').write('x')\n"
        f"try:\n    open({target!r}, 'w').write('x')\nexcept OSError:\n    print('contained')\n"
    )
    res = _run(probe, timeout=10.0, memory_mb=1024, file_size_mb=1)
    escaped = os.path.exists(target)
    if escaped:
        os.unlink(target)
    if escaped or res.status != "passed" or res.stdout != "contained\n":
        raise SandboxError(
            f"the sandbox probe was not contained (escaped={escaped}, status={res.status}, "
            f"stdout={res.stdout!r}, stderr={res.stderr[-300:]!r})"
        )


def run_python(
    code: str, timeout: float = 10.0, memory_mb: int = 1024, file_size_mb: int = 16
) -> SandboxResult:
    """Run `code` with this interpreter (`-I`) in the sandbox; CPU and wall clock bounded by `timeout`."""
    check_sandbox()
    return _run(code, timeout, memory_mb, file_size_mb)
