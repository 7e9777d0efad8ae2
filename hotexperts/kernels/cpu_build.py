"""Build (once) and load the C++ CPU MoE extension (kernels/csrc/cpu_moe.cpp, and cpu_worker.cpp: the
native thread that serves graphed decode steps, see experts/handoff.py).

load_extension(isa="native") -> module | None compiles with torch.utils.cpp_extension.load (ninja), flags
-O3 -march=native -fopenmp plus the ISA's (config.CPU_ISAS: "avx2" adds -mno-avx512f, "scalar" -mno-avx, to
build and test those paths on an AVX-512 machine), into ~/.cache/hotexperts/cpu_moe/<key>, where key hashes
the sources, the flags, the torch and Python versions and the CPU's flags (the code is built for the
machine it runs on). Without ninja it runs the same compiler command itself. The result is memoised per ISA;
on failure it returns None and `load_error(isa)` says why (the caller picks the torch fallback).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from hotexperts.config import CPU_ISAS

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("cpu_moe.cpp", "cpu_worker.cpp", "cpu_moe.h", "simd.h", "qdot512.h", "lut4.h")
UNITS = ("cpu_moe.cpp", "cpu_worker.cpp")   # translation units (the rest are headers)
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_mods: dict[str, object] = {}          # isa -> module (None: the build failed)
_errors: dict[str, str] = {}


def _cflags(isa: str = "native") -> list[str]:
    """CFLAGS plus the ISA's extra flags (part of the build key)."""
    return CFLAGS + list(CPU_ISAS[isa])


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def build_key(isa: str = "native") -> str:
    """The build directory's key: sources, torch, Python, CPU flags, cflags and the sources' directory (two
    checkouts of the same sources would otherwise rewrite each other's build.ninja and rebuild in turn)."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((CSRC / name).read_bytes())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{_cpu_flags()}|{_cflags(isa)}|{CSRC}".encode())
    return h.hexdigest()[:16]


def build_dir(key: str) -> Path:
    return Path(os.path.expanduser("~/.cache/hotexperts/cpu_moe")) / key


def load_extension(isa: str = "native"):
    """The compiled module for `isa`, or None (then `load_error(isa)` is the reason)."""
    if isa in _mods:
        return _mods[isa]
    mod = None
    try:
        from torch.utils import cpp_extension as ce

        key = build_key(isa)
        d = build_dir(key)
        d.mkdir(parents=True, exist_ok=True)
        name = f"hotexperts_cpu_moe_{key}"
        _clear_stale_lock(d)
        if ce.is_ninja_available():
            mod = ce.load(name=name, sources=[str(CSRC / u) for u in UNITS], extra_cflags=_cflags(isa),
                          extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=False)
        else:
            mod = _build_direct(name, d, isa)
    except Exception as e:  # compiler missing, headers missing, link error, ...
        msg = str(e).strip().splitlines()
        _errors[isa] = f"{type(e).__name__}: {msg[-1] if msg else ''}"
    _mods[isa] = mod
    return mod


STALE_LOCK_S = 30 * 60   # a build on 2 cores takes a few minutes; a lock this old was left by a killed one


def _clear_stale_lock(d: Path) -> None:
    """Remove torch's build lock when it is older than STALE_LOCK_S: a build killed mid-way leaves it, and
    every later load would wait on it forever."""
    lock = d / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        print(f"hotexperts: removing a stale build lock ({age / 60:.0f} min old): {lock}", file=sys.stderr)
        lock.unlink(missing_ok=True)


def _build_direct(name: str, d: Path, isa: str):
    """The command torch's ninja build runs, run by hand (one translation unit)."""
    from torch.utils import cpp_extension as ce

    so = d / f"{name}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if not so.exists():
        inc = [f"-I{p}" for p in [*ce.include_paths(), sysconfig.get_paths()["include"]]]
        libs = [f"-L{p}" for p in ce.library_paths()] + ["-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]
        tmp = d / f"{name}.{os.getpid()}.tmp.so"
        defs = [f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
        for std in ("-std=c++20", "-std=c++17"):         # torch >= 2.10 headers want C++20
            srcs = [str(CSRC / u) for u in UNITS]
            cmd = [os.environ.get("CXX", "c++"), *srcs, "-shared", "-fPIC", std, *_cflags(isa),
                   *defs, *inc, *libs, "-o", str(tmp)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                break
        if r.returncode:
            raise RuntimeError(f"compiler failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, so)
    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_error(isa: str = "native") -> str | None:
    return _errors.get(isa)
