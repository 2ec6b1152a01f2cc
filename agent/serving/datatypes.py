"""Open Inference Protocol datatypes as the wire carries them.

The names and their numpy counterparts are contract.tensors'; this adds
what the wire needs: the binary tensor extension is little-endian, so each
fixed-size type maps to an explicitly little-endian dtype. BYTES tensors are
numpy object arrays of `bytes`. BF16 has no numpy dtype and is not served.
"""

from __future__ import annotations

import numpy as np

from agent.runtimes.base import datatype_of_dtype
from contract.tensors import NUMPY_DTYPES

BYTES = "BYTES"

_FIXED: dict[str, np.dtype] = {
    name: np.dtype(numpy_name).newbyteorder("<")
    for name, numpy_name in NUMPY_DTYPES.items()
    if name != BYTES
}


def fixed_dtype(datatype: str) -> np.dtype | None:
    """The little-endian numpy dtype of a fixed-size DATATYPE; None for BYTES."""
    return _FIXED.get(datatype)


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of a runtime's output array (str/bytes/object arrays are BYTES)."""
    datatype = datatype_of_dtype(array.dtype)
    if datatype is None:
        raise TypeError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")
    return datatype
