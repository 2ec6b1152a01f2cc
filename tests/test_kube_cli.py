"""`edgefleet agent run --mode kubernetes`: bad input is one line, before anything is made."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from agent.cli import run
from hubproc import free_port
from kube import write_kubeconfig


def invoke(tmp_path: Path, *args: str) -> tuple[int, str]:
    done = CliRunner().invoke(run, ["--mode", "kubernetes", "--data-dir",
                                    str(tmp_path / "data"), *args])
    return done.exit_code, done.output


def test_a_namespace_is_needed(tmp_path: Path) -> None:
    code, out = invoke(tmp_path, "--kubeconfig", str(tmp_path / "none"))
    assert code == 2 and "--mode kubernetes needs --namespace" in out, out
    assert not (tmp_path / "data").exists()


def test_a_missing_kubeconfig_and_bad_resources_are_refused(tmp_path: Path) -> None:
    code, out = invoke(tmp_path, "--namespace", "edge", "--kubeconfig", str(tmp_path / "none"))
    assert code == 2 and "does not exist" in out, out
    (tmp_path / "kubeconfig").write_text("")
    code, out = invoke(tmp_path, "--namespace", "edge", "--kubeconfig",
                       str(tmp_path / "kubeconfig"), "--memory", "lots")
    assert code == 2 and "memory" in out and "lots" in out, out
    code, out = invoke(tmp_path, "--namespace", "Not_A_Namespace", "--kubeconfig",
                       str(tmp_path / "kubeconfig"))
    assert code == 2 and "Not_A_Namespace" in out, out
    assert not (tmp_path / "data").exists()


def test_an_unreachable_api_server_stops_enrollment_with_one_line(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig",
                                  server=f"https://127.0.0.1:{free_port()}", ca=ca,
                                  user={"token": "x"})
    token = tmp_path / "token"
    token.write_text("efe_x\n")
    code, out = invoke(tmp_path, "--namespace", "edge", "--kubeconfig", str(kubeconfig),
                       "--hub", "http://127.0.0.1:9", "--token-file", str(token))
    assert code == 1, out
    assert out.startswith("Error: cannot ") and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "data" / "identity.json").exists()
