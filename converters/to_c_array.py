#!/usr/bin/env python
"""Write a .tflite flatbuffer as a C array: NAME.h + NAME.cc (alignas(16), extern "C").

    python converters/to_c_array.py model.tflite -o firmware/src --name person_model
"""
import argparse
import sys
from pathlib import Path

import glt_keras  # noqa: F401
from glt_keras.convert import write_c_array
from glt_keras.convert.cli import c_identifier


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tflite", metavar="MODEL.tflite")
    parser.add_argument("-o", "--out-dir", default=".", help="folder for NAME.h / NAME.cc (default: .)")
    parser.add_argument("--name", help="C identifier (default: from the file name)")
    args = parser.parse_args(argv)
    name = args.name or c_identifier(Path(args.tflite).stem)
    try:
        h, cc = write_c_array(args.tflite, args.out_dir, name=name)
    except (ValueError, FileNotFoundError) as err:
        print(f"to_c_array: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {h} and {cc} ({name}_tflite, {name}_tflite_len)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
