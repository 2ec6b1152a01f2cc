"""A tiny LiteRT (.tflite) model, written without TensorFlow.

Run: python examples/litert-tiny/make_model.py [--out DIR]
y = x @ W + b for x of shape [N, 3]: the same builder the tests use
(packager/samples.py, the flatbuffers object API of ai_edge_litert's schema).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from packager.samples import make_tflite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "build")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(make_tflite(args.out / "model.tflite"))


if __name__ == "__main__":
    main()
