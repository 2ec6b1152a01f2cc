"""`edgefleet serve` as a process: start-up, the control socket, auth choice, clean exit.

Also home of ServeProcess/start_serve, which the other test_serving_* modules
use to drive a real serving process over loopback HTTP and its unix socket.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.supervisor import ServingError, ServingOptions, ServingProcess
from hubproc import free_port, stop_process
from modelgen import expected_linear, make_onnx

# Until `serve` is registered in edgefleet/cli.py, start the click command directly.
SERVE = [sys.executable, "-c", "from agent.serving.cli import serve; serve()"]
API_KEY = "test-serving-key"


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    url: str
    control_socket: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def control(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.control_socket)),
            base_url="http://serve",
            timeout=60,
        )

    def deploy(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.control() as control:
            answer = control.put(f"/control/deployments/{name}", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def metric(self, sample: str) -> float:
        """The value of one sample line, e.g. 'edgefleet_serving_in_flight'; 0 if absent."""
        with self.client() as client:
            text = client.get("/metrics").text
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return stop_process(self.process, sig, timeout)


def start_serve(
    tmp: Path, *args: str, auth: tuple[str, ...] | None = None, timeout: float = 30
) -> ServeProcess:
    """Start a serving process on a free loopback port with its control socket in TMP."""
    tmp.mkdir(parents=True, exist_ok=True)
    if auth is None:
        key_file = tmp / "api-key"
        key_file.write_text(API_KEY + "\n")
        auth = ("--api-key-file", str(key_file))
    control_socket = tmp / "serve.sock"
    log_path = tmp / "serve.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*SERVE, "--port", "0", "--control-socket", str(control_socket), *auth, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log_path.read_text())
        if found:
            served = ServeProcess(process, found.group(1), control_socket, log_path)
            try:
                if httpx.get(f"{served.url}/v2/health/live", timeout=1).status_code == 200:
                    return served
            except httpx.TransportError:
                pass
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"serve did not answer within {timeout}s:\n{log_path.read_text()}")


def onnx_version(model_dir: Path, version: str, **extra: Any) -> dict[str, Any]:
    """A control-API version body for the ONNX model in MODEL_DIR/model.onnx."""
    return {
        "version": version,
        "model_dir": str(model_dir),
        "entrypoint": "model.onnx",
        "framework": "onnx",
        "runtime": {"prefer": ["onnxruntime:CPU"]},
        **extra,
    }


# ---- the process ------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_onnx(tmp_path_factory.mktemp("linear") / "model.onnx").parent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_then_exits_0_on_signal_and_removes_its_socket(
    tmp_path: Path, linear_dir: Path, sig: int
) -> None:
    served = start_serve(tmp_path)
    try:
        assert f"Scoring API (Open Inference Protocol) on {served.url}" in served.log()
        assert str(served.control_socket) in served.log()
        # only this user may talk to the control API, which has no key of its own
        assert stat.S_IMODE(os.stat(served.control_socket).st_mode) == 0o600
        served.deploy("linear", onnx_version(linear_dir, "1"))
        x = np.array([[1, 2, 3]], dtype=np.float32)
        with served.client() as client:
            answer = client.post("/v2/models/linear/infer", json={
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]
            })
        assert answer.status_code == 200
        assert np.allclose(answer.json()["outputs"][0]["data"], expected_linear(x).ravel())
    finally:
        assert served.stop(sig) == 0, served.log()
    assert not served.control_socket.exists()
    assert "closed linear:1" in served.log()
    assert "Traceback" not in served.log()


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    stale = tmp_path / "serve.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a killed server leaves
    served = start_serve(tmp_path)
    try:
        with served.control() as control:
            assert control.get("/control/state").json()["deployments"] == []
        second = subprocess.run(
            [*SERVE, "--port", "0", "--control-socket", str(served.control_socket), "--no-auth"],
            capture_output=True, text=True, timeout=60,
        )
        assert second.returncode == 1
        assert f"another server is listening on {served.control_socket}" in second.stderr
    finally:
        assert served.stop() == 0


def test_busy_port_fails_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*SERVE, "--port", str(port), "--control-socket", str(tmp_path / "s.sock"),
             "--no-auth"],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_key_is_required_unless_no_auth_is_explicit(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_SERVE_")}
    base = [*SERVE, "--control-socket", str(tmp_path / "s.sock")]
    done = subprocess.run(base, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "--api-key-file" in done.stderr and "--no-auth" in done.stderr
    both = subprocess.run([*base, "--api-key", "k", "--no-auth"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_no_auth_serves_without_a_key(tmp_path: Path) -> None:
    served = start_serve(tmp_path, auth=("--no-auth",))
    try:
        assert "no API key" in served.log()
        with served.client(key=None) as client:
            assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    finally:
        assert served.stop() == 0


def test_help_has_an_example() -> None:
    from click.testing import CliRunner

    from agent.serving.cli import serve

    result = CliRunner().invoke(serve, ["--help"])
    assert result.exit_code == 0 and "Example:" in result.output


def test_the_agent_gives_up_on_a_serving_process_that_does_not_answer_within_its_start_timeout(
        tmp_path: Path) -> None:
    """--serve-start-timeout (ServingOptions.start_timeout) bounds the wait for a started
    serving process; none starts within 0.01 s, so the start is reported as failed."""
    key = tmp_path / "key"
    key.write_text(API_KEY)
    front = ServingProcess(tmp_path, ServingOptions("127.0.0.1", free_port(), key,
                                                    start_timeout=0.01))
    try:
        with pytest.raises(ServingError, match="did not answer within 0.01s"):
            front.start()
    finally:
        front.close()
