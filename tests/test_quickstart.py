"""README.md's Quickstart, run as written, so that it cannot drift from the CLI.

Its shell block runs in a temporary directory that looks like a clone (the venv
and examples/ linked in), with free ports in place of 8080, 1883 and 8500 and
its own config file, under `bash -euo pipefail`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from hubproc import free_port

ROOT = Path(__file__).resolve().parent.parent
PORTS = ("8080", "1883", "8500")  # hub REST, hub MQTT, agent scoring API


def quickstart_script(readme: str) -> str:
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"the Quickstart should have one ```sh block, has {len(blocks)}"
    return blocks[0]


def test_quickstart_has_the_ports_this_test_replaces() -> None:
    script = quickstart_script((ROOT / "README.md").read_text())
    for port in PORTS:
        assert port in script, f"the Quickstart no longer names port {port}: update this test"


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    script = quickstart_script((ROOT / "README.md").read_text())
    for port in PORTS:
        script = re.sub(rf"\b{port}\b", str(free_port()), script)
    (tmp_path / ".venv").symlink_to(sys.prefix)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "EDGEFLEET_CONFIG": str(tmp_path / "config.json"),
           "PYTHONPATH": str(ROOT), "COLUMNS": "120"}
    started = time.monotonic()
    # Its own session: on a failure the script stops before its last line (which stops
    # the hub and the agent), so everything in its process group is stopped here.
    script_process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True)
    try:
        stdout, stderr = script_process.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script_process.pid, signal.SIGTERM)
        script_process.wait()
    elapsed = time.monotonic() - started
    logs = "".join(f"\n--- {name}\n{(tmp_path / name).read_text()}"
                   for name in ("hub.log", "agent.log") if (tmp_path / name).exists())
    assert script_process.returncode == 0, f"{stdout}\n{stderr}{logs}"
    assert '"model_name":"diabetes","model_version":"2"' in stdout, stdout
    print(f"Quickstart ran in {elapsed:.1f}s")
