"""Microcontroller export: a self-contained C99 library per trained GLT model.

- :func:`export_c` (``glt_keras.mcu.export``): generate the library.
- ``glt_keras.mcu.host``: build it with the system ``cc`` and run images through it.
- ``glt_keras.mcu.qemu``: cross-compile for Cortex-M4 / M7 and run it bare-metal under
  QEMU (scores, flash, SRAM, instructions per inference).
- ``glt-keras export-c NAME_OR_MODEL -o DIR`` (``glt_keras.mcu.cli``).
"""
from .export import ExportResult, UnsupportedLayerError, export_c, parse_model

__all__ = ["export_c", "ExportResult", "UnsupportedLayerError", "parse_model"]
