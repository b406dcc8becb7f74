"""Compiled CPU kernels for decoding, built once per machine with the system C compiler.

``skinny_matmul.c``: two small-batch matmuls, more kernels for ``fast_linear`` to choose from
(kernel_tuning times them against the BLAS kernels on the model's own weights and keeps one only
where it is faster). ``rms_norm.c``: RMSNorm in one call instead of ~7 small ops. ``decode_attention.c``:
attention of a few new tokens per row over the KV cache, reading each row's keys and values once and
only up to that row's own length. All are inference-only:
calls that need autograd, other dtypes or devices get ``None`` and run the PyTorch code. When the
library cannot be built (no C compiler, not Linux, ``RESPEC_NATIVE_KERNELS=0``) everything runs as
before. It links the OpenMP runtime torch ships, so both share one thread pool and
``torch.set_num_threads`` applies.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..utils.paths import cache_dir

SOURCES = tuple(Path(__file__).with_name(name) for name in ("skinny_matmul.c", "rms_norm.c", "decode_attention.c"))
DISABLE_ENV = "RESPEC_NATIVE_KERNELS"
MAX_ROWS = 8
COLUMN_MULTIPLE = 32  # output features must be a multiple of the narrowest column tile
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None once a build was tried


def available() -> bool:
    return _library() is not None


def supports(out_features: int) -> bool:
    """Whether a weight with this many output features can use the kernel on this machine."""
    return out_features % COLUMN_MULTIPLE == 0 and available()


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x @ weight.T`` for a column-major fp32 CPU ``weight`` and at most ``MAX_ROWS`` rows of ``x``;
    None when the kernel cannot run this call (the caller uses another kernel)."""
    return _matmul(x, weight, "skinny_matmul")


def _matmul(x: torch.Tensor, weight: torch.Tensor, kernel: str) -> torch.Tensor | None:
    lib = _library()
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    # A stride check, not ``weight.t().is_contiguous()``: no view op on every decode-step matmul.
    if lib is None or not 1 <= rows <= MAX_ROWS or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or x.device.type != "cpu" or weight.stride(0) != 1 \
            or (in_features > 1 and weight.stride(1) != out_features):
        return None
    flat = x.reshape(rows, in_features).contiguous()
    out = torch.empty(rows, out_features, dtype=torch.float32)
    if getattr(lib, kernel)(flat.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, in_features, out_features):
        return None
    return out.reshape(*x.shape[:-1], out_features)


def stream_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """As ``skinny_matmul``, by the kernel that walks the weight's rows in order (wide weights)."""
    return _matmul(x, weight, "stream_matmul")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``weight * (x / sqrt(mean(x**2, -1) + eps))`` for fp32 CPU tensors outside autograd; None otherwise."""
    lib = _library()
    if lib is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu" \
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) \
            or not weight.is_contiguous() or x.shape[-1] != weight.shape[0]:
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def rope_and_cache(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   key_cache: torch.Tensor, value_cache: torch.Tensor, first_row: int, positions: torch.Tensor,
                   read_only: bool) -> torch.Tensor | None:
    """RoPE for the new tokens ``qk [B, T, heads + kv_heads, D]`` (cos/sin ``[B, T, 1, D]``) and, unless
    ``read_only``, their rotated keys and values ``v [B, T, kv_heads, D]`` stored at ``positions`` in
    cache rows ``first_row..``; returns the rotated queries ``[B, T, heads, D]``, or None when the
    kernel cannot run this call (nothing is then written)."""
    lib = _library()
    batch, steps, heads_and_kv, dim = qk.shape
    _, kv_heads, max_len, _ = key_cache.shape
    if lib is None or not _fp32_cpu(qk, v, cos, sin, key_cache, value_cache) or qk.stride(3) != 1 \
            or qk.stride(2) != dim or v.stride(3) != 1 or v.stride(2) != dim or not cos.is_contiguous() \
            or not sin.is_contiguous() or not key_cache.is_contiguous() or not value_cache.is_contiguous() \
            or positions.dtype != torch.int64 or (torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad)):
        return None
    positions = positions.contiguous()
    q_out = torch.empty(batch, steps, heads_and_kv - kv_heads, dim, dtype=torch.float32)
    if lib.rope_and_cache(qk.data_ptr(), qk.stride(0), qk.stride(1), v.data_ptr(), v.stride(0), v.stride(1),
                          cos.data_ptr(), sin.data_ptr(), q_out.data_ptr(), key_cache[first_row].data_ptr(),
                          value_cache[first_row].data_ptr(), int(read_only), positions.data_ptr(), batch, steps,
                          heads_and_kv - kv_heads, kv_heads, dim, max_len):
        return None
    return q_out


def attention_max_tokens() -> int:
    """New tokens per row ``decode_attention`` takes (a decode step or a verify block; the C source
    sets it); 0 without the compiled library."""
    return _state.get("attention_max_tokens", 0) if _library() is not None else 0  # type: ignore[return-value]


def _fp32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, first_row: int,
                     positions: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Attention of ``q [B, T, H, D]`` (D contiguous) over cache rows ``first_row..first_row + B`` of
    ``key_cache``/``value_cache [rows, kv_heads, max_len, D]``, each token attending to the cache
    positions up to its own in ``positions [B, T]``; ``[B, T, H, D]``. None when the kernel cannot
    run this call (the caller uses PyTorch's attention)."""
    lib = _library()
    batch, steps, heads, dim = q.shape
    _, kv_heads, max_len, _ = key_cache.shape
    if lib is None or not _fp32_cpu(q, key_cache, value_cache) or q.stride(3) != 1 or positions.dtype != torch.int64 \
            or not key_cache.is_contiguous() or not value_cache.is_contiguous() \
            or (torch.is_grad_enabled() and q.requires_grad):
        return None
    positions = positions.contiguous()
    out = torch.empty(batch, steps, heads, dim, dtype=torch.float32)
    if lib.decode_attention(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), key_cache[first_row].data_ptr(),
                            value_cache[first_row].data_ptr(), positions.data_ptr(), out.data_ptr(), batch, steps,
                            heads, kv_heads, dim, max_len, scale):
        return None
    return out


def build_tag() -> str:
    """Identifies the compiled kernels in use (sources, flags, CPU), "off" without them: timings
    taken with other kernels are stale."""
    return str(_state.get("tag", "off")) if _library() is not None else "off"


def _library() -> ctypes.CDLL | None:
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load() if os.environ.get(DISABLE_ENV, "1") != "0" else None
    return _state["lib"]  # type: ignore[return-value]


def _load() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if platform.system() != "Linux" or compiler is None:
        return None
    command = [compiler, "-O3", "-march=native", "-shared", "-fPIC", *_openmp_flags()]
    sources = "".join(source.read_text() for source in SOURCES)
    tag = hashlib.sha256((sources + " ".join(command) + _cpu_flags()).encode()).hexdigest()[:16]
    path = cache_dir() / "native" / f"respec_kernels-{tag}.so"
    try:
        if not path.is_file():
            print(f"compiling the CPU kernels with {Path(compiler).name}, once for this machine (into {path.parent})",
                  file=sys.stderr, flush=True)
            _build(command, path)
        lib = ctypes.CDLL(str(path))
        _state["tag"] = tag
    except (OSError, subprocess.SubprocessError):
        return None  # no working compiler or an unwritable cache: the BLAS kernels serve alone
    lib.skinny_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
    lib.skinny_matmul.restype = ctypes.c_int
    lib.stream_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
    lib.stream_matmul.restype = ctypes.c_int
    lib.rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float]
    lib.rms_norm.restype = None
    lib.decode_attention.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 4 \
        + [ctypes.c_long] * 6 + [ctypes.c_float]
    lib.decode_attention.restype = ctypes.c_int
    lib.rope_and_cache.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 2 + [ctypes.c_void_p] + [ctypes.c_long] * 2 \
        + [ctypes.c_void_p] * 5 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_long] * 6
    lib.rope_and_cache.restype = ctypes.c_int
    lib.decode_attention_max_tokens.restype = ctypes.c_long
    _state["attention_max_tokens"] = int(lib.decode_attention_max_tokens())
    return lib


def _build(command: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staging = Path(tmp) / path.name
        subprocess.run([*command, *map(str, SOURCES), "-lm", "-o", str(staging)], check=True, capture_output=True,
                       timeout=120)
        staging.replace(path)


def _openmp_flags() -> list[str]:
    # Link the libgomp torch loaded (same soname), never a second OpenMP runtime; without one the
    # kernel runs on one thread and the tuner will rarely pick it.
    torch_lib = Path(torch.__file__).parent / "lib"
    runtimes = sorted(torch_lib.glob("libgomp*.so*"))
    if not runtimes:
        return []
    return ["-fopenmp", f"-L{torch_lib}", f"-l:{runtimes[0].name}", f"-Wl,-rpath,{torch_lib}"]


def _cpu_flags() -> str:
    # -march=native code is only valid on this CPU: a cache shared between machines must not mix them.
    lines = cpu_info().splitlines()
    return "\n".join(line for line in lines if line.startswith(("flags", "Features", "model name"))) \
        or platform.processor()


@functools.cache
def cpu_info() -> str:
    """The first CPU's block of /proc/cpuinfo (empty where there is none), read once per process."""
    try:
        return Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return ""
