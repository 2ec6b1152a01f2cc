"""Train a Ridge regression on scikit-learn's bundled diabetes data and save it as ONNX.

Run: python examples/diabetes/train.py [--out DIR] [--alpha A]
Writes DIR/model.onnx (default: examples/diabetes/build/) and prints its RMSE.
The dataset ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def split() -> Split:
    """The data as (x_train, x_test, y_train, y_test): always the same 20 % held out."""
    x, y = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=0.2, random_state=0)
    return x_train, x_test, y_train, y_test


def train(out: Path, alpha: float = 0.1) -> dict[str, float]:
    x_train, x_test, y_train, y_test = split()
    model = Ridge(alpha=alpha).fit(x_train, y_train)
    rmse = float(np.sqrt(np.mean((model.predict(x_test) - y_test) ** 2)))
    # LinearRegressor (ai.onnx.ml) does not load in OpenVINO; MatMul + Add runs everywhere.
    onnx_model = to_onnx(
        model, x_train[:1], target_opset={"": 17, "ai.onnx.ml": 3}, black_op={"LinearRegressor"}
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(onnx_model.SerializeToString())
    return {"rmse": round(rmse, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "build")
    parser.add_argument("--alpha", type=float, default=0.1, help="Ridge regularisation strength")
    args = parser.parse_args()
    metrics = train(args.out, args.alpha)
    print(json.dumps({"model": str(args.out / "model.onnx"), **metrics}))


if __name__ == "__main__":
    main()
