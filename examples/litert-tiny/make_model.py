"""A tiny LiteRT (.tflite) model, written without TensorFlow.

Run: python examples/litert-tiny/make_model.py [--out DIR]
y = x @ W + b for x of shape [N, 3]: the same builder the tests use
(tests/modelgen.py, the flatbuffers object API of ai_edge_litert's schema).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from modelgen import make_tflite  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "build")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(make_tflite(args.out / "model.tflite"))


if __name__ == "__main__":
    main()
