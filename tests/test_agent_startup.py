"""What the agent daemon loads before it has anything to do.

`edgefleet agent run` execs `python -m agent` (agent/__main__.py) so the
long-running daemon starts without the CLI; the daemon loads cryptography
and the registry client at its first desired state. bench/agent.py measures
what this saves (idle RSS); this test keeps the heavy modules out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.daemon import AgentOptions

# Each costs an idle agent megabytes (bench/agent.py prints how many).
HEAVY = ["click", "rich", "httpx", "cryptography", "asyncio", "importlib.metadata", "numpy",
         "contract.verify", "packager.distribution"]


def test_the_daemon_starts_without_the_heavy_modules() -> None:
    code = "import sys, agent.__main__; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert [m for m in HEAVY if m in loaded] == []


def test_the_registry_client_comes_without_httpx_command_line_tool() -> None:
    code = ("import sys, agent.__main__, packager.distribution;"
            " print(' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert "httpx" in loaded
    assert [m for m in ("click", "rich", "pygments") if m in loaded] == []


def test_python_m_agent_says_how_it_is_started() -> None:
    done = subprocess.run([sys.executable, "-m", "agent"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "started by `edgefleet agent run`" in done.stderr


def test_python_m_agent_without_an_identity_says_how_to_enroll(tmp_path: Path) -> None:
    options = AgentOptions(data_dir=tmp_path).to_json()
    done = subprocess.run([sys.executable, "-m", "agent", options], capture_output=True, text=True)
    assert done.returncode == 1
    assert f"{tmp_path} holds no identity" in done.stderr
    assert "--token" in done.stderr


def test_options_survive_the_exec(tmp_path: Path) -> None:
    options = AgentOptions(data_dir=tmp_path, mqtt_url="mqtt://broker:1883", max_queue=3,
                           verbose=True, pause_in=("verifying", 2.5))
    assert AgentOptions.from_json(options.to_json()) == options
