"""The diabetes model as OpenVINO IR (model.xml + model.bin), registered as such.

Run: python examples/diabetes-openvino/export_ir.py [--out DIR]
Trains the ONNX model with examples/diabetes/train.py, converts it with
OpenVINO and saves fp32 weights (fp16 would be `--optimize fp16` at
packaging time, with an accuracy check).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "build")
    args = parser.parse_args()
    onnx_dir = args.out / "onnx"
    subprocess.run([sys.executable, str(HERE.parent / "diabetes" / "train.py"),
                    "--out", str(onnx_dir)], check=True)
    import openvino as ov

    model = ov.convert_model(str(onnx_dir / "model.onnx"))
    ir_dir = args.out / "ir"
    ir_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(ir_dir / "model.xml"), compress_to_fp16=False)
    print(f"IR written to {ir_dir}: register it with "
          f"`edgefleet model register {ir_dir} --name diabetes-ov`")


if __name__ == "__main__":
    main()
