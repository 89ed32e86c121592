"""Build an exported C library with the system compiler and run images through it.

    >>> result = export_c(model, "build/c_model")            # doctest: +SKIP
    >>> lib = build_host("build/c_model")                     # doctest: +SKIP
    >>> scores = lib.infer(images_uint8)                      # (N, classes)  # doctest: +SKIP

The library is compiled together with a small harness into a shared object and called
through ``ctypes``; the same sources are what a microcontroller build compiles.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["HostLibrary", "build_host", "run_host", "compile_check", "find_header", "read_macros", "as_images", "find_cc"]

HARNESS = r"""
#include <stddef.h>
#include "@HEADER@"

/* Host harness: a batch of images in, scores out. */
int glt_host_infer_batch(const uint8_t *images, int n, float *scores)
{
    int i;
    for (i = 0; i < n; ++i) {
        int rc = glt_infer(images + (size_t)i * GLT_INPUT_HEIGHT * GLT_INPUT_WIDTH * GLT_INPUT_CHANNELS,
                           scores + (size_t)i * GLT_NUM_CLASSES);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

int glt_host_call(const uint8_t *image, float *scores)
{
    return glt_infer(image, scores);
}

#ifdef GLT_LAYER_HOOK
#include <string.h>
#include "glt_internal.h"

/* Capture of every layer's packed output (tests): buffer of sum(layer words). */
static uint32_t *glt_host_capture_buf;

static uint32_t glt_host_words(uint32_t l)
{
    const glt_conv_t *L = &glt_layers[l];
    return l + 1 == GLT_NUM_CONV_LAYERS ? L->cout : (uint32_t)L->out_h * L->out_w * L->out_wpp;
}

uint32_t glt_host_layer_words(uint32_t l)
{
    return l < GLT_NUM_CONV_LAYERS ? glt_host_words(l) : 0u;
}

void glt_host_capture(uint32_t *buf)
{
    glt_host_capture_buf = buf;
}

void glt_host_layer_hook(uint32_t l, const uint32_t *out)
{
    uint32_t k, off = 0;
    if (glt_host_capture_buf == NULL) {
        return;
    }
    for (k = 0; k < l; ++k) {
        off += glt_host_words(k);
    }
    memcpy(glt_host_capture_buf + off, out, glt_host_words(l) * sizeof(uint32_t));
}
#endif
"""

REQUIRED_MACROS = ("GLT_INPUT_HEIGHT", "GLT_INPUT_WIDTH", "GLT_INPUT_CHANNELS", "GLT_NUM_CLASSES",
                   "GLT_PEAK_RAM_BYTES")


def find_cc(cc: str | None = None) -> str:
    cc = cc or os.environ.get("CC") or "cc"
    path = shutil.which(cc)
    if path is None:
        raise FileNotFoundError(f"C compiler {cc!r} not found: install gcc (apt-get install gcc) or set CC.")
    return path


def find_header(export_dir) -> Path:
    """The model header of an export directory (the .h that defines GLT_INPUT_HEIGHT)."""
    export_dir = Path(export_dir)
    for path in sorted(export_dir.glob("*.h")):
        if "#define GLT_INPUT_HEIGHT" in path.read_text():
            return path
    raise FileNotFoundError(f"{export_dir}: no model header (a .h defining GLT_INPUT_HEIGHT); run export_c first.")


def read_macros(header) -> dict:
    """Integer ``#define NAME value`` lines of a header."""
    macros = {}
    for match in re.finditer(r"^#define\s+(GLT_\w+)\s+(-?\d+)\s*$", Path(header).read_text(), re.M):
        macros[match.group(1)] = int(match.group(2))
    missing = [m for m in REQUIRED_MACROS if m not in macros]
    if missing:
        raise ValueError(f"{header}: missing macros {missing}.")
    return macros


def library_sources(export_dir) -> list[Path]:
    sources = sorted(Path(export_dir).glob("*.c"))
    if not sources:
        raise FileNotFoundError(f"{export_dir}: no C sources; run export_c first.")
    return sources


def compile_check(export_dir, *, cc: str | None = None, flags=("-std=c99", "-O2", "-Wall"),
                  out_dir=None) -> str:
    """Compile every source of the export on its own (``cc FLAGS -c``); return the
    compiler's diagnostics (empty when clean). Raises RuntimeError when it fails."""
    cc = find_cc(cc)
    tmp = tempfile.mkdtemp(prefix="glt_cc_") if out_dir is None else str(out_dir)
    messages = []
    try:
        for src in library_sources(export_dir):
            obj = Path(tmp) / (src.stem + ".o")
            proc = subprocess.run([cc, *flags, "-c", str(src), "-o", str(obj)],
                                  capture_output=True, text=True)
            messages.append(proc.stderr)
            if proc.returncode:
                raise RuntimeError(f"{cc} {' '.join(flags)} -c {src} failed:\n{proc.stderr}")
    finally:
        if out_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return "".join(messages)


def as_images(images, shape) -> np.ndarray:
    """Validate a batch (N, H, W, C) or one image (H, W, C) of pixels in 0..255 and
    return it as contiguous uint8 (N, H, W, C). Raises ValueError with the reason."""
    arr = np.asarray(images)
    shape = tuple(shape)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or tuple(arr.shape[1:]) != shape:
        raise ValueError(
            f"expected images of shape (N, {', '.join(map(str, shape))}) or {shape} (HWC uint8 pixels), "
            f"got shape {np.shape(images)}."
        )
    if arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ValueError(f"expected uint8 pixels, got dtype {arr.dtype}.")
        if arr.size and (np.any(arr < 0) or np.any(arr > 255) or np.any(arr != np.round(arr))):
            raise ValueError("pixels must be integers in 0..255 (the C library takes uint8 images).")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


@dataclass
class HostLibrary:
    """A compiled export: ``infer(images) -> scores``."""

    path: Path
    macros: dict
    layers: list = None  # per-layer summaries from plan.json

    def __post_init__(self):
        self._lib = ctypes.CDLL(str(self.path))
        u8p, f32p = ctypes.POINTER(ctypes.c_uint8), ctypes.POINTER(ctypes.c_float)
        self._lib.glt_host_infer_batch.argtypes = [u8p, ctypes.c_int, f32p]
        self._lib.glt_host_infer_batch.restype = ctypes.c_int
        self._lib.glt_host_call.argtypes = [u8p, f32p]
        self._lib.glt_host_call.restype = ctypes.c_int
        self._lib.glt_popcount_builtin.restype = ctypes.c_int

    @property
    def input_shape(self) -> tuple:
        m = self.macros
        return (m["GLT_INPUT_HEIGHT"], m["GLT_INPUT_WIDTH"], m["GLT_INPUT_CHANNELS"])

    @property
    def num_classes(self) -> int:
        return self.macros["GLT_NUM_CLASSES"]

    @property
    def peak_ram_bytes(self) -> int:
        return self.macros["GLT_PEAK_RAM_BYTES"]

    @property
    def popcount_builtin(self) -> bool:
        return bool(self._lib.glt_popcount_builtin())

    def infer(self, images) -> np.ndarray:
        """Scores (N, classes) float32 for uint8 images (N, H, W, C) or (H, W, C)."""
        batch = as_images(images, self.input_shape)
        scores = np.zeros((len(batch), self.num_classes), dtype=np.float32)
        rc = self._lib.glt_host_infer_batch(
            batch.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), len(batch),
            scores.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
        )
        if rc != 0:
            raise RuntimeError(f"glt_infer returned {rc}.")
        return scores

    def layer_words(self, image) -> list:
        """Every layer's packed output words (uint32, as in the arena) for one image.
        Needs a build with ``capture=True``."""
        if not hasattr(self._lib, "glt_host_capture"):
            raise RuntimeError("build the library with build_host(..., capture=True) to read layer outputs.")
        n_layers = self.macros["GLT_NUM_CONV_LAYERS"]
        self._lib.glt_host_layer_words.restype = ctypes.c_uint32
        words = [int(self._lib.glt_host_layer_words(ctypes.c_uint32(l))) for l in range(n_layers)]
        buf = np.zeros(sum(words), dtype=np.uint32)
        self._lib.glt_host_capture(buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)))
        try:
            self.infer(image)
        finally:
            self._lib.glt_host_capture(None)
        return np.split(buf, np.cumsum(words)[:-1])

    def layer_outputs(self, image) -> list:
        """Every layer's output for one image, unpacked from the C library's arena:
        ``(H, W, C)`` int8 +-1 maps for the binary layers (channels in Keras order,
        i.e. after max-pool and channel shuffle) and the head's integer sums over
        H x W (one per class). Needs a build with ``capture=True``."""
        chunks = self.layer_words(image)
        outputs = []
        for l, chunk in enumerate(chunks):
            if l + 1 == len(chunks):
                outputs.append(chunk.view(np.int32).copy())
                continue
            lay = self.layers[l]["out_layout"]
            h, w, c, cpg, wpg, wpp = (lay[k] for k in ("h", "w", "channels", "cpg", "wpg", "wpp"))
            bits = np.unpackbits(chunk.reshape(h, w, wpp).view(np.uint8), axis=-1, bitorder="little")
            bits = bits.reshape(h, w, wpp // wpg, wpg * 32)[..., :cpg].reshape(h, w, -1)[..., :c]
            if "keras_channel" in lay:  # position j holds Keras channel keras_channel[j]
                keras_bits = np.empty_like(bits)
                keras_bits[..., np.asarray(lay["keras_channel"])] = bits
                bits = keras_bits
            outputs.append(np.where(bits > 0, 1, -1).astype(np.int8))
        return outputs

    def call_raw(self, image=None, scores=None) -> int:
        """Call glt_infer directly (None = NULL pointer); returns its status code."""
        u8p, f32p = ctypes.POINTER(ctypes.c_uint8), ctypes.POINTER(ctypes.c_float)
        img = None if image is None else as_images(image, self.input_shape)[0]
        img_ptr = ctypes.cast(None, u8p) if img is None else img.ctypes.data_as(u8p)
        out_ptr = ctypes.cast(None, f32p) if scores is None else scores.ctypes.data_as(f32p)
        return int(self._lib.glt_host_call(img_ptr, out_ptr))


def build_host(export_dir, *, build_dir=None, cc: str | None = None, cflags=("-O2",),
               builtin_popcount: bool | None = None, capture: bool = False) -> HostLibrary:
    """Compile the export + harness into a shared library and load it.

    ``builtin_popcount``: ``True`` defines ``GLT_USE_BUILTIN_POPCOUNT``, ``False``
    ``GLT_NO_BUILTIN_POPCOUNT`` (portable SWAR), ``None`` the library's default.
    ``capture``: also compile the layer hook, for :meth:`HostLibrary.layer_outputs`.
    """
    export_dir = Path(export_dir)
    cc = find_cc(cc)
    header = find_header(export_dir)
    macros = read_macros(header)
    temporary = build_dir is None
    build_dir = Path(tempfile.mkdtemp(prefix="glt_host_")) if temporary else Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    harness = build_dir / "glt_host_harness.c"
    harness.write_text(HARNESS.replace("@HEADER@", header.name))
    defines = ["-DGLT_LAYER_HOOK=glt_host_layer_hook"] if capture else []
    if builtin_popcount is True:
        defines.append("-DGLT_USE_BUILTIN_POPCOUNT")
    elif builtin_popcount is False:
        defines.append("-DGLT_NO_BUILTIN_POPCOUNT")
    # A unique file name: ctypes / dlopen would return an already loaded library of the same path.
    fd, lib_path = tempfile.mkstemp(prefix="libglt_", suffix=".so", dir=build_dir)
    os.close(fd)
    cmd = [cc, "-std=c99", *cflags, *defines, "-fPIC", "-shared", "-Wl,-Bsymbolic", f"-I{export_dir}",
           *map(str, library_sources(export_dir)), str(harness), "-o", lib_path, "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"host build failed: {' '.join(cmd)}\n{proc.stderr}")
        plan = export_dir / "plan.json"
        layers = json.loads(plan.read_text())["layers"] if plan.exists() else None
        return HostLibrary(Path(lib_path), macros, layers)  # loaded: the file may go now
    finally:
        if temporary:
            shutil.rmtree(build_dir, ignore_errors=True)


def run_host(export_dir, images, **kwargs) -> np.ndarray:
    """Build (in a temporary directory) and run: scores (N, classes)."""
    return build_host(export_dir, **kwargs).infer(images)
