"""What the CPU and TensorFlow's kernels can do fast: bfloat16 dot products (AVX512-BF16,
AMX) and oneDNN (which holds the fast bfloat16 and grouped convolutions)."""
from __future__ import annotations

import functools
import os

#: /proc/cpuinfo flags of CPUs with native bfloat16 dot products.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def onednn_enabled() -> bool:
    """TensorFlow runs its oneDNN kernels (``TF_ENABLE_ONEDNN_OPTS=0`` turns them off; TF
    reads the variable once, at start-up, so a process never sees it change)."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("0", "false"):
        return False
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


def bf16_is_fast() -> bool:
    """A CPU with AVX512-BF16 or AMX, and oneDNN on."""
    return bool(cpu_flags() & set(BF16_CPU_FLAGS)) and onednn_enabled()
