"""Sensor conditions: fixed, documented transforms of raw uint8 pixels, as a camera would deliver
a badly exposed or flat scene (the encoding study's test of where a learned tone curve pays).

Each condition is a 256-entry look-up table applied to every channel of every pixel, the same on
train, validation and test images (a recipe's ``data.sensor``). Pixels are gamma-encoded (about
sRGB, gamma 2.2), so a change of exposure by ``s`` stops in linear light scales the encoded value
by ``2 ** (s / 2.2)``; results are rounded half up (``floor(v + 0.5)``) and clipped to [0, 255].
With ``p`` the input pixel:

================  ===================================================  ===============
condition         output                                               output range
================  ===================================================  ===============
``normal``        ``p``                                                0..255
``under_exposed`` ``round(p * 2 ** (-3 / 2.2))`` = ``round(0.3889 p)``:   0..99
                  3 stops (8x) less light
``over_exposed``  ``min(255, round(p * 2 ** (2 / 2.2)))`` =              0..255, every
                  ``min(255, round(1.8780 p))``: 2 stops (4x) more     ``p >= 136`` at 255
                  light, clipped where the sensor saturates
``low_contrast``  ``round(127.5 + (p - 127.5) / 4)``: a flat, hazy      96..159
                  scene (a quarter of the contrast around mid-grey)
================  ===================================================  ===============

No noise is added: every condition is a deterministic function of the pixel.

    >>> apply_sensor(np.array([[[[0, 128, 255]]]], np.uint8), "under_exposed").ravel().tolist()
    [0, 50, 99]
    >>> apply_sensor(np.array([[[[0, 128, 255]]]], np.uint8), "low_contrast").ravel().tolist()
    [96, 128, 159]
"""
from __future__ import annotations

import numpy as np

__all__ = ["SENSOR_CONDITIONS", "apply_sensor", "sensor_lut"]

#: Display gamma of the encoded pixels (stops of exposure -> scale of the encoded value).
GAMMA = 2.2

#: name -> (what it models, the transform of float pixel values 0..255 before rounding).
SENSOR_CONDITIONS = {
    "normal": ("the images as stored", lambda p: p),
    "under_exposed": ("3 stops (8x) under-exposed", lambda p: p * 2.0 ** (-3 / GAMMA)),
    "over_exposed": ("2 stops (4x) over-exposed, clipped at 255", lambda p: p * 2.0 ** (2 / GAMMA)),
    "low_contrast": ("a quarter of the contrast around mid-grey", lambda p: 127.5 + (p - 127.5) / 4.0),
}


def sensor_lut(condition: str) -> np.ndarray:
    """The condition's look-up table: uint8 ``(256,)``, entry ``p`` = output for input ``p``."""
    if condition not in SENSOR_CONDITIONS:
        raise ValueError(f"Unknown sensor condition {condition!r}; choose one of {sorted(SENSOR_CONDITIONS)}.")
    p = np.arange(256, dtype=np.float64)
    out = np.floor(SENSOR_CONDITIONS[condition][1](p) + 0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


def apply_sensor(images, condition: str | None) -> np.ndarray:
    """``images`` (uint8, any shape) as the sensor ``condition`` delivers them (uint8, same shape).

    ``None`` or ``"normal"`` returns the images unchanged (no copy)."""
    images = np.asarray(images)
    if condition in (None, "normal"):
        sensor_lut(condition or "normal")  # an unknown name still fails
        return images
    if images.dtype != np.uint8:
        raise TypeError(f"apply_sensor: expects uint8 pixels, got {images.dtype}.")
    return sensor_lut(condition)[images]
