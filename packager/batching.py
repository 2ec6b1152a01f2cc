"""Whether a package should batch by default: measured at build time, on the build machine.

Adaptive batching (agent/serving/batching.py) pays when one runtime call on
many rows costs much less than as many calls on one row each: small models,
whose per-call cost is mostly fixed, and models that read large weights on
every call. It does not pay for a model whose work grows with its rows
(a compute-bound network on CPU): merged requests then only wait for each
other. So the packager times the model on the package's runtime: the best
of REPEAT calls with one row (the sample request's) against the best of
REPEAT calls with PROBE_ROWS rows. When the batch costs at most 1/GAIN of
PROBE_ROWS single calls, serving.json gets `"batching": {"max_batch_size":
PROBE_ROWS, "max_delay_ms": 0}`, the serving process's default for the
model unless the deployment says otherwise. Only for a signature whose every
input and output has a free first dimension.

The decision is a measurement, so a model near the line could be decided
differently on another machine (another serving.json, another digest);
`--batching off` or `--batching N` make the build independent of it. The
packager does not import the agent: the caller passes the timer (the
agent's `agent.runtimes.time_on_cpu`, the code a device runs).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.settings import unbatchable
from contract.tensors import Signature
from packager.prepare import PrepareError, sample_inputs, stage_files

if TYPE_CHECKING:
    import numpy as np

    Tensors = dict[str, np.ndarray]

# (runtime, model_dir, entrypoint, inputs, repeat) -> the best seconds of one call per input
ModelTimer = Callable[[str, Path, str, "list[Tensors]", int], list[float]]

PROBE_ROWS = 32
GAIN = 2.0  # the batch must be at least this much cheaper than its rows called one by one
REPEAT = 20


@dataclass(frozen=True)
class BatchingProfile:
    setting: dict[str, int] | None  # serving.json's batching, or None: off by default
    note: str  # what was measured, for the build's notes


def measure_batching(
    timer: ModelTimer, runtime: str, files: Mapping[str, Path], entrypoint: str,
    signature: Mapping[str, Any] | None,
) -> BatchingProfile:
    """Time the model of FILES (relative name -> file) on RUNTIME with one row and with
    PROBE_ROWS; PrepareError if the timer cannot run it."""
    if signature is None:
        return BatchingProfile(None, "batching: off (the model has no signature)")
    typed = Signature.from_dict(signature)
    why = unbatchable(typed)
    if why is not None:
        return BatchingProfile(None, f"batching: off ({why})")
    import numpy as np

    one = sample_inputs(typed, 0, 0)[0]  # the sample request
    many = {name: np.repeat(array, PROBE_ROWS, axis=0) for name, array in one.items()}
    with tempfile.TemporaryDirectory(prefix="edgefleet-batching-") as tmp:
        model_dir = Path(tmp)
        stage_files(files, model_dir)  # the prepared files may live in several folders
        try:
            single, batch = timer(runtime, model_dir, entrypoint, [one, many], REPEAT)
        except Exception as e:  # the timer is the caller's; its message is what helps
            raise PrepareError(f"could not time {entrypoint} on {runtime}: {e}") from e
    measured = (f"{PROBE_ROWS} rows in one call {batch * 1000:.3f} ms, one by one"
                f" {PROBE_ROWS * single * 1000:.3f} ms")
    if batch * GAIN <= PROBE_ROWS * single:
        return BatchingProfile({"max_batch_size": PROBE_ROWS, "max_delay_ms": 0},
                               f"batching: on by default ({measured})")
    return BatchingProfile(None, f"batching: off by default ({measured})")
