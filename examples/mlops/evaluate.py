"""Champion and challenger scored alike: the RMSE of an ONNX file on the held-out data.

Both models are run by onnxruntime, as on the devices, on the split that
examples/diabetes/train.py holds out, so the numbers compare even when the
champion's stored metric came from another machine or library version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnxruntime as ort

from examples.diabetes.train import split


def dataset_digest() -> str:
    """sha256 of the training and held-out data, in order: the same data, the same digest."""
    digest = hashlib.sha256()
    for part in split():
        digest.update(np.ascontiguousarray(part).tobytes())
    return "sha256:" + digest.hexdigest()


def rmse(model: Path) -> float:
    """The model's RMSE on the held-out 20 %."""
    _, x_test, _, y_test = split()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predicted = np.asarray(session.run(None, {name: x_test})[0]).reshape(-1)
    return round(float(np.sqrt(np.mean((predicted - y_test) ** 2))), 3)
