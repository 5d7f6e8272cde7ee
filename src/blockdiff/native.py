"""The decode step in C++ (`csrc/step.cpp`), compiled once per machine, loaded where it can be.

A one-token step of SmolLM2 runs ~1000 operator calls besides its matrix products: ~1-20 µs each
of allocation, dispatch and TorchScript's interpreter, a third of the step (BENCHMARKS.md).
`layers` runs them as loops in one call; `runtime.FusedLayers` uses it for forwards of at most
`runtime.NATIVE_ROWS` (32) tokens per sequence and keeps TorchScript for wide ones (prompts, wide
diffusion blocks), where operator overhead is small against the matrix products. The extension
also holds the 4-/8-bit kernels: `csrc/lowbit.cpp` (one token) and `csrc/tiles.cpp` (AMX tiles,
several tokens, where the CPU has them; `BLOCKDIFF_TILES=0` turns them off).

Built with the system's C++ compiler (`$CXX`, else `c++`) against the installed torch, for this
CPU (`-march=native`), into the blockdiff cache keyed by source, torch, Python, compiler and CPU:
the first use compiles (~30 s on 2 cores; `make setup` does it ahead), later ones load. Where
that fails (no compiler, no headers) the runtime warns once and runs TorchScript;
`BLOCKDIFF_NATIVE=0` asks for that.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

from .config import cache_dir

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "step.cpp", CSRC / "lowbit.cpp", CSRC / "tiles.cpp"]  # and their headers, in the build key
NAME = "blockdiff_step"
# -ffp-contract=off: no fused multiply-adds, so an elementwise step rounds where torch's op does;
# -fno-trapping-math (no floating-point traps: values unchanged) lets the loops with selects vectorise.
FLAGS = [
    *("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"),
    *("-std=c++20", "-shared", "-fPIC", "-w"),
]


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "c++"))


def _flags() -> list[str]:
    """FLAGS, then `$BLOCKDIFF_NATIVE_FLAGS` (e.g. -mno-avx512f: the portable kernels, as a CPU
    without AVX-512 builds them)."""
    return [*FLAGS, *shlex.split(os.environ.get("BLOCKDIFF_NATIVE_FLAGS", ""))]


def _cpu() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags (x86 `flags`, Arm
    `Features`)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        keys = ("model name", "flags", "Features", "CPU part")
        return "\n".join(sorted({l for l in info.splitlines() if l.startswith(keys)}))
    except OSError:
        return platform.processor() or platform.machine()


@functools.cache
def _key() -> str:
    """Source, torch (its build, not only its version), Python, compiler, flags and CPU."""
    try:
        cxx = subprocess.run([*_compiler(), "--version"], capture_output=True, text=True).stdout
    except OSError:
        cxx = "none"
    parts = [f.read_text() for f in sorted(CSRC.iterdir()) if f.suffix in (".cpp", ".h")]
    parts += [torch.__version__, str(torch.version.git_version), torch.__file__]
    parts += [str(torch._C._GLIBCXX_USE_CXX11_ABI), sys.version, cxx, " ".join(_flags()), _cpu()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def built_path() -> Path:
    return cache_dir() / "native" / _key() / (NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def build() -> Path:
    """The compiled extension's path, compiling it first if needed (atomic: concurrent builders
    each write their own file and rename it into place)."""
    out = built_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    libs = cpp_extension.library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    compile_ = [
        *_compiler(),
        *_flags(),
        f"-DTORCH_EXTENSION_NAME={NAME}",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in includes),
    ]
    link = [f"-L{libs}", "-ltorch", "-ltorch_cpu", "-lc10", "-ltorch_python", f"-Wl,-rpath,{libs}"]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs = [Path(tmp) / (f.stem + ".o") for f in SOURCES]
        jobs = [  # one process per source: torch's headers make each ~20 s
            (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for cmd in ([*compile_, "-c", str(f), "-o", str(o)] for f, o in zip(SOURCES, objs, strict=True))
        ]
        errs = [job.communicate()[1] for _, job in jobs]  # every job waited for before any error
        for (cmd, job), err in zip(jobs, errs, strict=True):
            if job.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed: {err.strip()[-2000:]}")
        so = Path(tmp) / out.name
        cmd = [*_compiler(), *_flags(), *map(str, objs), "-o", str(so), *link]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {done.stderr.strip()[-2000:]}")
        os.replace(so, out)  # atomic: a concurrent builder's file is replaced by an equal one
    return out


def _load(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def layers():
    """The compiled `layers` function (signature of `runtime.decoder_stack`), or None where it
    cannot be had here (warned once) or `BLOCKDIFF_NATIVE=0`."""
    m = module()
    return None if m is None else m.layers


@functools.cache
def module():
    """The compiled extension (`layers`; `lowbit_pack`/`lowbit_mm`, csrc/lowbit.cpp; `tiles_usable`/
    `tiles_pack`/`tiles_mm`, csrc/tiles.cpp), or None
    where it cannot be had here (warned once) or `BLOCKDIFF_NATIVE=0`."""
    if os.environ.get("BLOCKDIFF_NATIVE", "1") == "0":
        return None
    try:
        try:
            return _load(build())
        except ImportError:  # a build that no longer loads (a damaged file): build it again, once
            built_path().unlink(missing_ok=True)
            return _load(build())
    except Exception as e:  # no compiler, no headers, a foreign build: TorchScript
        warnings.warn(
            f"the native decode step is unavailable, TorchScript runs it (slower): {e}", stacklevel=2
        )
        return None


if __name__ == "__main__":  # `python -m blockdiff.native`: build ahead of the first use (make setup)
    fn = module()
    print(f"native decode step: {built_path()}" if fn else "native decode step: unavailable (TorchScript)")
    sys.exit(0)
