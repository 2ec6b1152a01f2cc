"""Open Inference Protocol datatype names and the numpy dtypes that carry them.

The binary tensor extension is little-endian, so every fixed-size type maps
to an explicitly little-endian dtype. BYTES tensors are numpy object arrays
of `bytes`. BF16 has no numpy dtype and is not served.
"""

from __future__ import annotations

import numpy as np

_FIXED: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

BYTES = "BYTES"


def fixed_dtype(datatype: str) -> np.dtype | None:
    """The numpy dtype of a fixed-size DATATYPE; None for BYTES."""
    return _FIXED.get(datatype)


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of a runtime's output array (str/bytes/object arrays are BYTES)."""
    if array.dtype.kind in "OSU":
        return BYTES
    for name, dtype in _FIXED.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return name
    raise TypeError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")
