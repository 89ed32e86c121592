"""Cross-compile an exported C library for Cortex-M4 / M7 and run it under QEMU.

The firmware is the exported library + a minimal startup (vector table, FPU enable,
.data/.bss init), a linker script for QEMU's MPS2 boards and a harness that runs a
few images embedded in flash and prints, over ARM semihosting:

- the scores of every image as IEEE-754 bit patterns (compared with the host build);
- SysTick ticks per inference. QEMU runs with ``-icount shift=0``: the virtual clock
  advances exactly 1 ns per executed instruction, so ticks x (ns per tick) is the
  number of instructions. The ratio is calibrated in the firmware itself with a
  busy loop of a known instruction count (2 x N for ``subs; bne``). This counts
  instructions, not cycles: QEMU models no pipeline, caches or wait states (a
  Cortex-M4 runs most of these ALU instructions in 1 cycle, loads in 2);
- the stack used by ``glt_infer`` (painted stack, lowest overwritten word).

Sizes: ``arm-none-eabi-size -A`` of the library's own objects (``.text`` + ``.rodata``
+ ``.data`` = flash, ``.bss`` = the static arena), next to the whole firmware.

Boards: ``mps2-an386`` (Cortex-M4, ``-mcpu=cortex-m4 -mfloat-abi=hard
-mfpu=fpv4-sp-d16``) and ``mps2-an500`` (Cortex-M7, ``-mfpu=fpv5-sp-d16``).
Toolchain: Debian ``gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm``
(:func:`ensure_toolchain` installs them with apt-get when allowed).
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .host import as_images, find_header, library_sources, read_macros

__all__ = [
    "TARGETS", "ToolchainUnavailable", "ensure_toolchain", "build_firmware", "run_firmware",
    "Firmware", "QemuRun", "cortex_m_report", "VWW_INT8_REFERENCE_BYTES",
]

#: MLPerf Tiny reference: int8 VWW MobileNetV1-0.25 flatbuffer (anchors/vww_96_int8.tflite).
VWW_INT8_REFERENCE_BYTES = 333_288

TARGETS = {
    "cortex-m4": dict(machine="mps2-an386",
                      flags=("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")),
    "cortex-m7": dict(machine="mps2-an500",
                      flags=("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-sp-d16")),
}

DEBIAN_PACKAGES = ("gcc-arm-none-eabi", "libnewlib-arm-none-eabi", "qemu-system-arm")
CAL_LOOPS = 1_000_000


class ToolchainUnavailable(RuntimeError):
    """arm-none-eabi-gcc / newlib / qemu-system-arm are missing and cannot be installed."""


def _tools_present() -> bool:
    if not (shutil.which("arm-none-eabi-gcc") and shutil.which("arm-none-eabi-size")
            and shutil.which("qemu-system-arm")):
        return False
    # newlib: the cross compiler must find libc.a / nosys.specs.
    proc = subprocess.run(["arm-none-eabi-gcc", "-print-file-name=nosys.specs"], capture_output=True, text=True)
    return proc.returncode == 0 and os.path.isabs(proc.stdout.strip())


def ensure_toolchain(install: bool = True, *, timeout: float = 900) -> None:
    """Make sure the cross toolchain and QEMU are there; install the Debian packages
    (``apt-get install -y``) when missing and ``install`` is true. Raises
    :class:`ToolchainUnavailable` with the reason otherwise."""
    if _tools_present():
        return
    if not install:
        raise ToolchainUnavailable(
            f"arm-none-eabi-gcc / newlib / qemu-system-arm not found; install {' '.join(DEBIAN_PACKAGES)}."
        )
    if shutil.which("apt-get") is None:
        raise ToolchainUnavailable(f"no apt-get to install {' '.join(DEBIAN_PACKAGES)}.")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise ToolchainUnavailable(f"not root: cannot apt-get install {' '.join(DEBIAN_PACKAGES)}.")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []
    for cmd in (["apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES],
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ToolchainUnavailable(f"{' '.join(cmd)} failed: {err}") from err
        log.append(proc.stdout[-2000:] + proc.stderr[-2000:])
        if cmd[1] == "install" and proc.returncode == 0 and _tools_present():
            return
    raise ToolchainUnavailable(
        f"could not install {' '.join(DEBIAN_PACKAGES)} with apt-get:\n" + "\n".join(log)[-3000:]
    )


def _template(name: str) -> str:
    return (resources.files("glt_keras.mcu") / "templates" / name).read_text()


def _run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def _section_sizes(objects) -> dict:
    """Sum of section sizes (arm-none-eabi-size -A) by kind: text, rodata, data, bss."""
    sizes = dict(text=0, rodata=0, data=0, bss=0)
    out = _run(["arm-none-eabi-size", "-A", *objects]).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit() or not parts[0].startswith("."):
            continue
        name, size = parts[0], int(parts[1])
        for kind in ("text", "rodata", "data", "bss"):
            if name == f".{kind}" or name.startswith(f".{kind}."):
                sizes[kind] += size
    return sizes


def _stack_usage(su_files) -> dict:
    usage = {}
    for su in su_files:
        for line in Path(su).read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1].strip().isdigit():
                usage[parts[0].split(":")[-1]] = int(parts[1])
    return usage


@dataclass
class Firmware:
    elf: Path
    cpu: str
    machine: str
    num_images: int
    num_classes: int
    library_sizes: dict  # text / rodata / data / bss of the library objects
    firmware_sizes: dict  # same for the linked ELF
    frame_sizes: dict  # -fstack-usage of the library's functions (static, bytes)
    macros: dict

    @property
    def library_flash_bytes(self) -> int:
        s = self.library_sizes
        return s["text"] + s["rodata"] + s["data"]

    @property
    def library_static_ram_bytes(self) -> int:
        return self.library_sizes["data"] + self.library_sizes["bss"]


def build_firmware(export_dir, images, *, cpu: str = "cortex-m4", build_dir=None, opt: str = "-O2",
                   stack_size: int = 16384, extra_cflags=(), per_layer: bool = False,
                   dump_layers: bool = False) -> Firmware:
    """Cross-compile the export + startup + harness with ``images`` embedded in flash.

    ``per_layer``: also time every layer (through the library's ``GLT_LAYER_HOOK``; adds
    a few bytes of code to the library objects). ``dump_layers``: print every layer's
    packed output words instead (``QemuRun.layer_words``; the timings then include the
    printing)."""
    if cpu not in TARGETS:
        raise ValueError(f"cpu must be one of {sorted(TARGETS)}, got {cpu!r}.")
    ensure_toolchain(install=False)
    export_dir = Path(export_dir)
    header = find_header(export_dir)
    macros = read_macros(header)
    shape = (macros["GLT_INPUT_HEIGHT"], macros["GLT_INPUT_WIDTH"], macros["GLT_INPUT_CHANNELS"])
    batch = as_images(images, shape)
    build_dir = Path(build_dir) if build_dir else Path(tempfile.mkdtemp(prefix=f"glt_{cpu}_"))
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = [*TARGETS[cpu]["flags"], opt, "-ffunction-sections", "-fdata-sections", *extra_cflags]
    if per_layer and dump_layers:
        raise ValueError("per_layer and dump_layers are exclusive.")
    if per_layer or dump_layers:
        flags.append("-DGLT_LAYER_HOOK=glt_fw_layer_hook")
    if dump_layers:
        flags.append("-DGLT_DUMP_LAYERS")

    # Images as const data.
    n, size = len(batch), int(np.prod(shape))
    lines = ["#include <stdint.h>\n#include \"glt_test_images.h\"\n",
             f"const uint8_t glt_test_images[GLT_TEST_IMAGE_COUNT][{size}] = {{"]
    for img in batch:
        flat = img.reshape(-1)
        lines.append("  {" + ",".join(map(str, flat.tolist())) + "},")
    lines.append("};\n")
    (build_dir / "glt_test_images.c").write_text("\n".join(lines))
    (build_dir / "glt_test_images.h").write_text(
        f"#include <stdint.h>\n#define GLT_TEST_IMAGE_COUNT {n}\n#define GLT_CAL_LOOPS {CAL_LOOPS}u\n"
        f"extern const uint8_t glt_test_images[GLT_TEST_IMAGE_COUNT][{size}];\n"
    )
    (build_dir / "cm_startup.c").write_text(_template("cm_startup.c"))
    (build_dir / "cm_main.c").write_text(_template("cm_main.c").replace("@HEADER@", header.name))
    (build_dir / "cm_link.ld").write_text(_template("cm_link.ld").replace("@STACK_SIZE@", str(stack_size)))

    objects, lib_objects, su_files = [], [], []
    for src in library_sources(export_dir):
        obj = build_dir / f"lib_{src.stem}.o"
        _run(["arm-none-eabi-gcc", "-std=c99", "-Wall", "-fstack-usage", *flags, "-c", src, "-o", obj])
        lib_objects.append(obj)
        su_files.append(obj.with_suffix(".su"))
    for src in ("cm_startup.c", "cm_main.c", "glt_test_images.c"):
        obj = build_dir / (Path(src).stem + ".o")
        _run(["arm-none-eabi-gcc", "-std=gnu99", "-Wall", *flags, f"-I{export_dir}", f"-I{build_dir}",
              "-c", build_dir / src, "-o", obj])
        objects.append(obj)
    elf = build_dir / f"glt_{cpu.replace('-', '_')}.elf"
    _run(["arm-none-eabi-gcc", *flags, "-nostartfiles", "--specs=nosys.specs", "-Wl,--gc-sections",
          f"-T{build_dir / 'cm_link.ld'}", f"-Wl,-Map={build_dir / 'firmware.map'}",
          *objects, *lib_objects, "-lm", "-o", elf])
    return Firmware(
        elf=elf, cpu=cpu, machine=TARGETS[cpu]["machine"], num_images=n, num_classes=macros["GLT_NUM_CLASSES"],
        library_sizes=_section_sizes(lib_objects), firmware_sizes=_section_sizes([elf]),
        frame_sizes=_stack_usage(su_files), macros=macros,
    )


@dataclass
class QemuRun:
    scores: np.ndarray  # (N, classes) float32, bit-exact from the target
    instructions: list  # per image
    ticks: list
    stack_bytes: list  # measured stack use of glt_infer per image
    instructions_per_tick: float
    null_rc: int
    layer_instructions: list | None = None  # per image, per layer (per_layer=True builds)
    layer_words: list | None = None  # per image, per layer: uint32 output words (dump_layers=True)
    stdout: str = field(repr=False, default="")

    @property
    def instructions_per_inference(self) -> int:
        return int(round(float(np.median(self.instructions))))


def run_firmware(fw: Firmware, *, timeout: float = 600) -> QemuRun:
    """Run the firmware bare-metal under ``qemu-system-arm -icount shift=0`` and parse it."""
    cmd = ["qemu-system-arm", "-M", fw.machine, "-nographic", "-monitor", "none", "-serial", "none",
           "-semihosting-config", "enable=on,target=native", "-icount", "shift=0,align=off,sleep=off",
           "-kernel", str(fw.elf)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"QEMU timed out after {timeout} s: {' '.join(cmd)}") from err
    out = proc.stdout + proc.stderr  # QEMU writes semihosting output to stderr
    if proc.returncode != 0 or "GLT done" not in out:
        raise RuntimeError(f"QEMU run failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    cal = re.search(r"^GLT cal (\d+) (\d+)$", out, re.M)
    ipt = int(cal.group(1)) / max(int(cal.group(2)), 1)
    scores = np.zeros((fw.num_images, fw.num_classes), dtype=np.float32)
    ticks, stack = [0] * fw.num_images, [0] * fw.num_images
    for m in re.finditer(r"^GLT image (\d+) rc (\d+) ticks (\d+) stack (\d+)$", out, re.M):
        i = int(m.group(1))
        if int(m.group(2)) != 0:
            raise RuntimeError(f"glt_infer returned {m.group(2)} for image {i} on {fw.cpu}.")
        ticks[i], stack[i] = int(m.group(3)), int(m.group(4))
    for m in re.finditer(r"^GLT scores (\d+)((?: [0-9a-f]{8})+)$", out, re.M):
        words = [int(h, 16) for h in m.group(2).split()]
        scores[int(m.group(1))] = np.frombuffer(struct.pack(f"<{len(words)}I", *words), dtype="<f4")
    null = re.search(r"^GLT null (\d+)$", out, re.M)
    layers = [None] * fw.num_images
    for m in re.finditer(r"^GLT layers (\d+)((?: \d+)+)$", out, re.M):
        layers[int(m.group(1))] = [int(round(int(t) * ipt)) for t in m.group(2).split()]
    dumps = {}
    for m in re.finditer(r"^GLT dump (\d+) (\d+) (\d+)((?: [0-9a-f]{8})+)$", out, re.M):
        words = dumps.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), {})
        words[int(m.group(3))] = [int(h, 16) for h in m.group(4).split()]
    layer_words = None
    if dumps:
        layer_words = [[np.array([w for k in sorted(dumps[i][l]) for w in dumps[i][l][k]], dtype=np.uint32)
                        for l in sorted(dumps[i])] for i in sorted(dumps)]
    return QemuRun(scores=scores, instructions=[int(round(t * ipt)) for t in ticks], ticks=ticks,
                   stack_bytes=stack, instructions_per_tick=ipt, null_rc=int(null.group(1)),
                   layer_instructions=layers if layers[0] is not None else None,
                   layer_words=layer_words, stdout=out)


def cortex_m_report(export_dir, images, *, cpus=("cortex-m4", "cortex-m7"), host_scores=None,
                    build_dir=None, timeout: float = 600) -> dict:
    """Build and run on each CPU; flash / SRAM / instructions per inference and the
    agreement with ``host_scores`` (e.g. from :func:`glt_keras.mcu.host.run_host`)."""
    report = {}
    for cpu in cpus:
        bdir = None if build_dir is None else Path(build_dir) / cpu
        fw = build_firmware(export_dir, images, cpu=cpu, build_dir=bdir)
        run = run_firmware(fw, timeout=timeout)
        stack = max(run.stack_bytes)
        entry = {
            "machine": fw.machine,
            "library_flash_bytes": fw.library_flash_bytes,
            "library_sizes": fw.library_sizes,
            "firmware_sizes": fw.firmware_sizes,
            "static_ram_bytes": fw.library_static_ram_bytes,
            "peak_ram_macro": fw.macros["GLT_PEAK_RAM_BYTES"],
            "stack_bytes_measured": stack,
            "peak_sram_bytes": fw.library_static_ram_bytes + stack,
            "instructions_per_inference": run.instructions_per_inference,
            "instructions_per_tick": run.instructions_per_tick,
            "null_rc": run.null_rc,
            "flash_vs_vww_int8": fw.library_flash_bytes / VWW_INT8_REFERENCE_BYTES,
            "scores": run.scores,
        }
        if host_scores is not None:
            host_scores = np.asarray(host_scores, dtype=np.float32)
            entry["max_abs_diff_vs_host"] = float(np.abs(run.scores - host_scores).max())
            entry["argmax_equal_host"] = bool(np.array_equal(run.scores.argmax(1), host_scores.argmax(1)))
        report[cpu] = entry
    return report
