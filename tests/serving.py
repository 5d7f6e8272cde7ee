"""A real `blockdiff serve` process on a free 127.0.0.1 port, for the server and page tests."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*args: str, ready_s: float = 180.0, limit_as: int | None = None):
    """`limit_as`: an address-space limit in bytes (`prlimit --as`), so that a request that would
    allocate without bound fails inside the server instead of taking the machine's memory."""
    port = free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "blockdiff", "serve", "--port", str(port), *args]
    if limit_as is not None and shutil.which("prlimit"):
        cmd = ["prlimit", f"--as={limit_as}", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if request(url, "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() - t0 > ready_s:
                raise RuntimeError("server did not become ready")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _conn(url: str, timeout: float) -> http.client.HTTPConnection:
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def _headers(key: str | None) -> dict[str, str]:
    h = {"content-type": "application/json"}
    if key:
        h["authorization"] = f"Bearer {key}"
    return h


def request(
    url: str, path: str, body: dict | str | None = None, key: str | None = None, timeout: float = 120
):
    """(status, parsed JSON body) of one plain HTTP request; a str body is sent as is."""
    c = _conn(url, timeout)
    data = None if body is None else body if isinstance(body, str) else json.dumps(body)
    c.request("GET" if body is None else "POST", path, body=data, headers=_headers(key))
    r = c.getresponse()
    raw = r.read()
    c.close()
    return r.status, json.loads(raw) if raw else None


@contextmanager
def stream(url: str, path: str, body: dict, key: str | None = None) -> Iterator[tuple[int, Iterator[str]]]:
    """(status, the response's lines) of a streaming POST; leaving the block closes the socket."""
    c = _conn(url, 120)
    c.request("POST", path, body=json.dumps(body), headers=_headers(key))
    r = c.getresponse()
    try:
        yield r.status, (line.decode().rstrip("\r\n") for line in r)
    finally:
        c.close()


def headless_chromium(profile: Path, size: str = "1400,1000"):
    """Debian's chromium through its chromedriver (selenium), with the flags this closed network needs."""
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={size}",
    ):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=opts, service=service)
