"""Reading .tflite files (atomic writes are in glt_keras._io)."""
from __future__ import annotations

import os
from pathlib import Path

#: Every TFLite flatbuffer carries this file identifier at bytes 4..8.
TFLITE_IDENTIFIER = b"TFL3"




def check_tflite_bytes(fb: bytes, source: str = "the flatbuffer") -> None:
    """Raise ``ValueError`` unless ``fb`` looks like a TFLite flatbuffer."""
    if len(fb) < 8:
        raise ValueError(f"{source} is not a TFLite model: only {len(fb)} bytes.")
    if fb[4:8] != TFLITE_IDENTIFIER:
        raise ValueError(
            f"{source} is not a TFLite model: bytes 4..8 are {bytes(fb[4:8])!r}, expected the "
            f"flatbuffer identifier {TFLITE_IDENTIFIER!r} (corrupt, truncated or another format)."
        )


def read_tflite(fb_or_path) -> tuple[bytes, str]:
    """``(flatbuffer bytes, description)`` from bytes or a ``.tflite`` path, checked."""
    if isinstance(fb_or_path, (bytes, bytearray, memoryview)):
        fb, source = bytes(fb_or_path), "the flatbuffer"
    elif isinstance(fb_or_path, (str, os.PathLike)):
        path = Path(fb_or_path)
        if not path.exists():
            raise FileNotFoundError(f"No such .tflite file: {path}")
        if path.is_dir():
            raise ValueError(f"{path} is a directory, expected a .tflite file.")
        fb, source = path.read_bytes(), str(path)
    else:
        raise TypeError(
            f"Expected flatbuffer bytes or a path to a .tflite file, got {type(fb_or_path).__name__}."
        )
    check_tflite_bytes(fb, source)
    return fb, source
