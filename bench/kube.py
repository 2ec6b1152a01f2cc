"""A real Kubernetes control plane on loopback, for tests and benchmarks.

    from kube import kube_cluster  # noqa: F401  (the fixture, in tests/kube.py)

    def test_x(kube_cluster: KubeCluster) -> None:
        core = kubernetes.client.CoreV1Api(kube_cluster.admin_client())

etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built once
by `.ci/k8s-tools`) run as child processes on free loopback ports, with a
private data directory and certificates made here: a CA, the API server's
serving certificate, an admin client certificate (system:masters) and the
service-account signing key. kwok fakes the nodes (FAKE_NODES, one amd64 and
one arm64) and their pods' status, so Deployments become Ready without a
kubelet or a container runtime. No pod really runs: pod IPs are made up and
nothing connects to them.

`service_account_kubeconfig()` writes a kubeconfig with a bound token of a
ServiceAccount, to test what its RBAC role allows.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from bench.harness import (
    EDGEFLEET,
    HubProcess,
    enrollment_token,
    free_port,
    stop_process,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
K8S_TOOLS = REPO / ".ci" / "k8s-tools"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"


@dataclass(frozen=True)
class FakeNode:
    name: str
    architecture: str
    cpu: str = "4"
    memory: str = "16Gi"
    extended: tuple[tuple[str, str], ...] = ()   # e.g. (("nvidia.com/gpu", "1"),)


FAKE_NODES = (
    FakeNode("kwok-amd64", "amd64", extended=(("nvidia.com/gpu", "1"),)),
    FakeNode("kwok-arm64", "arm64", cpu="2", memory="8Gi"),
)


def core_v1(api: Any) -> Any:
    """CoreV1Api without its types: tests read answers whose shape they know, and every
    field of the typed models is Optional."""
    from kubernetes import client

    return client.CoreV1Api(api)


def apps_v1(api: Any) -> Any:
    from kubernetes import client

    return client.AppsV1Api(api)


class MissingBinaries(RuntimeError):
    """The control plane's binaries are not built: the message says how to build them."""


def k8s_bin_dir() -> Path:
    done = subprocess.run(["bash", str(K8S_TOOLS), "--bin-dir"], capture_output=True, text=True)
    if done.returncode != 0:
        raise MissingBinaries(done.stderr.strip() or "the Kubernetes test binaries are missing: "
                              "run .ci/k8s-tools")
    return Path(done.stdout.strip())


# --- certificates -------------------------------------------------------------

def _pem_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization is not None:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


@dataclass
class Pki:
    """The cluster's certificates, written as PEM files into DIRECTORY."""

    directory: Path

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(minutes=5)
        self._not_after = now + datetime.timedelta(days=1)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        self._ca_cert = (
            self._builder(_name("edgefleet-test-ca"), self._ca_key.public_key())
            .issuer_name(_name("edgefleet-test-ca"))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = self._write("ca.crt", self._ca_cert.public_bytes(serialization.Encoding.PEM))
        self.serving_cert, self.serving_key = self._issue(
            "kube-apiserver", None, server=True,
            dns=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"],
            ips=["127.0.0.1"],
        )
        self.admin_cert, self.admin_key = self._issue("edgefleet-test-admin", "system:masters")
        # RSA: what every component and client library accepts for service-account tokens.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.service_account_key = self._write("sa.key", _pem_key(sa_key))
        self.service_account_pub = self._write("sa.pub", sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey
                 ) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(self._not_before).not_valid_after(self._not_after))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def _issue(self, common_name: str, organization: str | None, *, server: bool = False,
               dns: list[str] | None = None, ips: list[str] | None = None) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.ExtendedKeyUsageOID.SERVER_AUTH if server \
            else x509.ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            self._builder(_name(common_name, organization), key.public_key())
            .issuer_name(self._ca_cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips or []]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        return (self._write(f"{common_name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{common_name}.key", _pem_key(key)))


# --- kubeconfigs --------------------------------------------------------------

def write_kubeconfig(path: Path, *, server: str, ca: Path, user: dict[str, str],
                     namespace: str = "default") -> Path:
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server,
                                                  "certificate-authority": str(ca)}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user",
                                                  "namespace": namespace}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# --- the cluster --------------------------------------------------------------

@dataclass
class KubeCluster:
    directory: Path
    bin_dir: Path
    nodes: tuple[FakeNode, ...] = FAKE_NODES
    api_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.directory / "admin.kubeconfig"

    def log(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {name}.log\n" + "\n".join(self.log(name).splitlines()[-lines:])
                         for name in self.processes)

    def admin_client(self):  # -> kubernetes.client.ApiClient
        return self.client(self.admin_kubeconfig)

    def client(self, kubeconfig: Path):  # -> kubernetes.client.ApiClient
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig))

    def start(self, timeout: float = 120) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        pki = Pki(self.directory / "pki")
        self.pki = pki
        write_kubeconfig(self.admin_kubeconfig, server=self.url, ca=pki.ca,
                         user={"client-certificate": str(pki.admin_cert),
                               "client-key": str(pki.admin_key)})
        etcd_port, etcd_peer = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn("etcd", [
            "--name=test", f"--data-dir={self.directory / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=test=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync", "--log-level=warn",
        ])
        self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}", f"--cert-dir={self.directory / 'apiserver'}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca}",
            f"--service-account-key-file={pki.service_account_pub}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--authorization-mode=Node,RBAC",
            # No kubelet answers on the advertised address: keep the kubernetes
            # Service's endpoints out of it.
            "--endpoint-reconciler-type=none",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true", "--profiling=false",
        ])
        self._wait_ready(timeout)
        for name in ("kube-controller-manager", "kube-scheduler"):
            port = free_port()
            args = [f"--kubeconfig={self.admin_kubeconfig}", "--leader-elect=false",
                    "--bind-address=127.0.0.1", f"--secure-port={port}",
                    f"--cert-dir={self.directory / name}"]
            if name == "kube-controller-manager":
                args += [f"--service-account-private-key-file={pki.service_account_key}",
                         f"--root-ca-file={pki.ca}", "--use-service-account-credentials=false"]
            self._spawn(name, args)
        self._spawn("kwok", [
            f"--kubeconfig={self.admin_kubeconfig}",
            f"--config={self.bin_dir.parent / 'etc' / 'kwok-stages.yaml'}",
            "--node-lease-duration-seconds=40",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
            "--cidr=10.244.0.1/16", "--node-ip=10.244.0.1",
            f"--server-address=127.0.0.1:{free_port()}",
        ])
        self._add_nodes()
        self._wait_for_default_service_account(timeout)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.directory / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            [str(self.bin_dir / name), *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        log.close()

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n"
                                   + self.log(name)[-4000:])

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        tls = ssl.create_default_context(cafile=str(self.pki.ca))
        tls.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        with httpx.Client(verify=tls, timeout=5) as http:
            while True:
                self._check_alive()
                try:
                    if http.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"kube-apiserver not ready in {timeout} s\n"
                                       + self.logs_tail())
                time.sleep(0.2)

    def _add_nodes(self) -> None:
        with self.admin_client() as api:
            core = core_v1(api)
            for node in self.nodes:
                capacity = {"cpu": node.cpu, "memory": node.memory, "pods": "110",
                            **dict(node.extended)}
                core.create_node({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {
                        "name": node.name,
                        "annotations": {FAKE_NODE_ANNOTATION: "fake"},
                        "labels": {"kubernetes.io/arch": node.architecture,
                                   "kubernetes.io/os": "linux",
                                   "kubernetes.io/hostname": node.name, "type": "kwok"},
                    },
                    "status": {
                        "capacity": capacity, "allocatable": capacity,
                        "nodeInfo": {"architecture": node.architecture, "operatingSystem": "linux",
                                     "kubeletVersion": "fake", "kubeProxyVersion": "fake",
                                     "containerRuntimeVersion": "fake",
                                     "osImage": "", "kernelVersion": "", "machineID": "",
                                     "systemUUID": "", "bootID": ""},
                    },
                })

    def _wait_for_default_service_account(self, timeout: float) -> None:
        # Pods are refused until the controller manager made the namespace's
        # default ServiceAccount; nodes count once kwok reports them Ready.
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + timeout
        with self.admin_client() as api:
            core = core_v1(api)
            while True:
                self._check_alive()
                try:
                    core.read_namespaced_service_account("default", "default")
                    ready = [n for n in core.list_node().items
                             if any(c.type == "Ready" and c.status == "True"
                                    for c in n.status.conditions or ())]
                    if len(ready) == len(self.nodes):
                        return
                except ApiException as e:
                    if e.status != 404:
                        raise
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not settled in {timeout} s\n" + self.logs_tail())
                time.sleep(0.2)

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path,
                                   seconds: int = 3600) -> Path:
        """A kubeconfig that authenticates as ServiceAccount NAMESPACE/NAME (which must exist)."""
        with self.admin_client() as api:
            token = core_v1(api).create_namespaced_service_account_token(
                name, namespace,
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                 "spec": {"expirationSeconds": seconds}},
            ).status.token
        return write_kubeconfig(path, server=self.url, ca=self.pki.ca, user={"token": token},
                                namespace=namespace)

    def stop(self) -> None:
        # The reverse of the start order: etcd last.
        for name in reversed(list(self.processes)):
            stop_process(self.processes[name], timeout=15)
        self.processes.clear()


@dataclass
class KubeAgentProcess:
    """`edgefleet agent run --mode kubernetes` as a child process."""

    data_dir: Path
    process: subprocess.Popen
    log_path: Path

    @property
    def device_id(self) -> str:
        return str(json.loads((self.data_dir / "identity.json").read_text())["device_id"])

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return stop_process(self.process, sig, timeout=30)


def start_kube_agent(hub: HubProcess, kubeconfig: Path, namespace: str, data_dir: Path, *,
                     tags: dict[str, str] | None = None, env: dict[str, str] | None = None,
                     extra_args: tuple[str, ...] = ()) -> KubeAgentProcess:
    """Start (and on a first start, enroll) a cluster agent for NAMESPACE; returns once the
    hub has its first reported state (with the cluster's inventory)."""
    log_path = data_dir.parent / f"{data_dir.name}-agent.log"
    args = [*EDGEFLEET, "agent", "run", "--mode", "kubernetes", "--data-dir", str(data_dir),
            "--kubeconfig", str(kubeconfig), "--namespace", namespace, *extra_args]
    if not (data_dir / "identity.json").exists():
        args += ["--hub", hub.url, "--token", enrollment_token(hub, tags=tags or {})]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    agent = KubeAgentProcess(data_dir, process, log_path)

    def reported() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"agent exited with {process.returncode}:\n{agent.log()}")
        if not (data_dir / "identity.json").exists():
            return False
        record = httpx.get(f"{hub.url}/api/v1/devices/{agent.device_id}", timeout=10,
                           headers={"Authorization": f"Bearer {hub.admin_token}"}).json()
        return record["status"] == "online" and "agent_version" in (record["inventory"] or {})

    wait_for(reported, timeout=60, what="the cluster agent's first reported state")
    return agent
