"""One call to export a model and check it end to end: Keras vs host C vs Cortex-M (QEMU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .export import export_c
from .host import build_host
from .qemu import VWW_INT8_REFERENCE_BYTES

__all__ = ["mcu_report", "random_images", "format_report"]


def random_images(shape, n: int = 8, seed: int = 0) -> np.ndarray:
    """Test images: smooth random gradients plus noise (uint8, (n, H, W, C)), so that
    both flat regions and edges reach the thermometer."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    images = []
    for _ in range(n):
        base = rng.uniform(0, 255, (1, 1, c)) + rng.uniform(-200, 200, (1, 1, c)) * (
            yy[..., None] * rng.uniform(-1, 1) + xx[..., None] * rng.uniform(-1, 1))
        images.append(base + rng.normal(0, rng.uniform(5, 60), (h, w, c)))
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


def mcu_report(model, out_dir, *, name: str = "glt_model", images=None, n_images: int = 8,
               cpus=("cortex-m4",), seed: int = 0, qemu_images: int = 2, timeout: float = 900) -> dict:
    """Export ``model`` to ``out_dir``, run ``images`` through Keras and the host C build
    (identical argmax, max score difference) and, for each CPU in ``cpus``, through a
    QEMU bare-metal build (flash, SRAM, instructions per inference, agreement with the
    host build on the first ``qemu_images`` images)."""
    result = export_c(model, out_dir, name=name)
    if images is None:
        images = random_images(result.input_shape, n_images, seed)
    images = np.asarray(images)
    keras_scores = np.asarray(model(images.astype("float32"), training=False), dtype=np.float32)
    host = build_host(out_dir, build_dir=Path(out_dir) / "build_host")
    host_scores = host.infer(images)
    diff = np.abs(host_scores - keras_scores)
    report = {
        "export": result.summary(),
        "host": {
            "images": int(len(images)),
            "argmax_equal": bool(np.array_equal(host_scores.argmax(1), keras_scores.argmax(1))),
            "max_abs_diff": float(diff.max()),
            "max_rel_diff": float((diff / np.maximum(np.abs(keras_scores), 1e-6)).max()),
            "popcount_builtin": host.popcount_builtin,
        },
        "vww_int8_reference_bytes": VWW_INT8_REFERENCE_BYTES,
    }
    if cpus:
        from .qemu import cortex_m_report, ensure_toolchain

        ensure_toolchain(install=True)
        sub = images[:qemu_images]
        cm = cortex_m_report(out_dir, sub, cpus=cpus, host_scores=host_scores[: len(sub)],
                             build_dir=Path(out_dir) / "build_cortex_m", timeout=timeout)
        for entry in cm.values():
            entry.pop("scores", None)
        report["cortex_m"] = cm
    return report


def format_report(report: dict) -> str:
    ex, host = report["export"], report["host"]
    lines = [
        f"{ex['name']}: {ex['out_dir']}  input {'x'.join(map(str, ex['input_shape']))}, "
        f"{ex['num_classes']} classes{' (softmax)' if ex['softmax'] else ''}",
        f"  static RAM plan (GLT_PEAK_RAM_BYTES): {ex['peak_ram_bytes']:,} B; packed weights "
        f"{ex['weight_bytes']:,} B; const data {ex['const_bytes']:,} B",
        f"  host C vs Keras on {host['images']} images: argmax {'identical' if host['argmax_equal'] else 'DIFFERENT'}, "
        f"max |diff| {host['max_abs_diff']:.3g} (max rel {host['max_rel_diff']:.3g})",
    ]
    for cpu, e in report.get("cortex_m", {}).items():
        lines.append(
            f"  {cpu} ({e['machine']}): flash {e['library_flash_bytes']:,} B "
            f"({e['library_flash_bytes'] / report['vww_int8_reference_bytes']:.1%} of the "
            f"{report['vww_int8_reference_bytes']:,} B VWW int8 flatbuffer), SRAM {e['peak_sram_bytes']:,} B "
            f"(static {e['static_ram_bytes']:,} + stack {e['stack_bytes_measured']:,}), "
            f"{e['instructions_per_inference']:,} instructions / inference, "
            + ("scores bit-identical to host" if e.get("max_abs_diff_vs_host", 1) == 0
               else f"argmax {'identical to' if e.get('argmax_equal_host') else 'DIFFERENT from'} host, "
                    f"max |score diff| {e.get('max_abs_diff_vs_host', float('nan')):.2g}")
        )
    return "\n".join(lines)
