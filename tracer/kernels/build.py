"""Building the kernels: shared libraries from ``kernels/*.c``, compiled once per source and compiler.

The system C compiler (``$CC``, else ``cc``) builds two libraries (:data:`PARTS`): ``matvec.c`` and
``attend.c`` (the 16/32-bit products and attention) into
``$XDG_CACHE_HOME/llama-tracer/kernels-core-<key>.so``, and ``quant.c`` (GGUF's blocks) into
``kernels-quant-<key>.so``, each key a hash of its sources, the flags and the compiler's
``--version``; no torch headers are needed. Apart, so that a compiler that cannot build one (an
old one without the AVX-512 intrinsics ``quant.c`` uses, say) takes only that part's functions
down: without the core there is no kernel; without quant, quantized layers use torch's path
(``Library.quant_reason`` says why). Three things make a build safe to run from anywhere, any
number of times:

- every compiler call has a time limit (a compiler that hangs means "no kernel", not a hung load);
- the build holds a lock on the cache folder, so two processes (two notebooks) starting at once
  compile once: the second waits, then finds the library;
- the library is written to a temporary file and renamed into place, so a crash never leaves half
  a library where a later process would load it.

Nothing is built at import: :func:`library` is called by whoever decided to use the kernels
(``tracer.fast.use_kernels``), and it never raises: a failure is the returned library's ``reason``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from .library import Library

try:  # POSIX; elsewhere builds are not locked (and the kernel is x86-64 Linux/macOS in practice)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

_HERE = Path(__file__).parent
PARTS = {"core": (_HERE / "matvec.c", _HERE / "attend.c"), "quant": (_HERE / "quant.c",)}
SOURCES = tuple(src for sources in PARTS.values() for src in sources)
HEADERS = (_HERE / "widen.h",)
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared"]
# Seconds a compiler may take to say its version, and to build the library (about a second here).
VERSION_TIMEOUT = 30
BUILD_TIMEOUT = 300


class Unavailable(Exception):
    """Why there is no kernel (the message becomes ``Library.reason``)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama-tracer"


def run_compiler(args: list[str], what: str, timeout: float) -> str:
    """Run the compiler with ``args``; its stdout. Every call goes through here: output captured,
    a time limit. Raises :class:`Unavailable` (naming ``what`` was tried) when the compiler cannot
    be run, fails, or takes longer than ``timeout`` seconds."""
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True, timeout=timeout).stdout
    except OSError as e:
        raise Unavailable(f"no C compiler: {args[0]!r} cannot be run ({e.strerror}); set CC to one") from None
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{what} took over {timeout:g} s; gave up (set CC to a working compiler)") from None
    except subprocess.CalledProcessError as e:
        raise Unavailable(f"{what} failed: {(e.stderr or '').strip()[:500]}; set CC to a working compiler") from None


@functools.cache
def library() -> Library:
    """The kernels' library, built and loaded once per process (:func:`load`); never raises: see
    its ``available`` and ``reason``."""
    return load()


def load() -> Library:
    """Build the libraries (unless these sources and compiler were built before) and load them;
    never raises."""
    cc = os.environ.get("CC", "cc")
    try:
        _check_machine()
        version = run_compiler([cc, "--version"], f"no C compiler: '{cc} --version'", VERSION_TIMEOUT)
        core = _built(cc, version, "core")
    except Unavailable as e:
        return Library(None, str(e))
    try:
        return Library.open(core, _built(cc, version, "quant"))
    except Unavailable as e:
        return Library.open(core, None, quant_reason=str(e))


def _check_machine() -> None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise Unavailable(f"the kernel is x86-64 only; this machine is {platform.machine()}")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise Unavailable(f"the kernel needs AVX2; torch reports CPU capability {capability}")


def _built(cc: str, version: str, part: str) -> Path:
    """Library ``part``'s path (:data:`PARTS`), compiled first if no process has compiled it yet."""
    sources = b"".join(src.read_bytes() for src in PARTS[part] + HEADERS)
    key = hashlib.sha256(sources + " ".join(FLAGS).encode() + version.encode()).hexdigest()
    path = cache_dir() / f"kernels-{part}-{key[:16]}.so"
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent):
            if not path.exists():  # another process may have built it while this one waited
                _compile(cc, path, PARTS[part])
    except OSError as e:
        raise Unavailable(f"could not build the kernel into {path.parent}: {e}") from None
    return path


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on ``folder`` itself (flock on the directory: no lock file left behind)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _compile(cc: str, path: Path, sources: tuple[Path, ...]) -> None:
    """Compile ``sources`` into a temporary file in ``path``'s folder, then rename it into place (atomic)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        what = f"building {', '.join(src.name for src in sources)} with {cc}"
        run_compiler([cc, *FLAGS, *map(str, sources), "-o", tmp], what, BUILD_TIMEOUT)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
