"""`edgefleet hub serve`: first-start setup, then the broker, the REST API and the fleet link.

Unless an external broker is named (--mqtt-url), the hub starts Mosquitto
and keeps it running (hub/broker.py) and manages its device identities:
client certificates and their revocation list (hub/broker_certs.py), or with
--insecure password logins (hub/broker_logins.py). The REST API is HTTPS
and the managed broker's listener TLS, with the hub's own CA (hub/pki.py)
or the user's --tls-cert; only --insecure serves plain text, and says so.
The REST API (uvicorn) runs on the asyncio loop; the fleet link
(hub/fleet.py: ingest and desired-state publishing) and the broker's
supervisor run in threads of their own. SIGINT/SIGTERM stop
uvicorn gracefully, then the fleet link, then the broker, and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import pwd
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn

from contract import tls
from contract.files import write_atomic, write_secret
from hub import desired, devices, packages, pki, tokens
from hub.api.app import create_app
from hub.api.metrics import standalone as metrics_app
from hub.api.state import HubState
from hub.broker import BrokerError, ManagedBroker, find_mosquitto, hub_secret
from hub.broker_certs import BrokerCertificates
from hub.broker_config import BrokerConfig, BrokerTls, hub_username
from hub.broker_logins import BrokerLogins
from hub.drift import DriftWatch
from hub.fleet import FleetLink
from hub.keys import KeyRing
from hub.leader import Leader
from hub.liveness import Liveness
from hub.oci_registry import Uploads
from hub.periodic import Periodic
from hub.retention import Retention
from hub.rollout_engine import RolloutEngine
from hub.settings import UNSPECIFIED, HubSettings
from hub.storage.blobs import BlobStore, FileBlobStore
from hub.storage.db import Database
from hub.storage.s3 import Credentials, S3BlobStore, S3Client
from hub.webhooks import Dispatcher

log = logging.getLogger("edgefleet.hub")


@dataclass(frozen=True)
class Bound:
    """The ports actually in use (a setting of 0 means "pick a free one")."""

    api_url: str
    mqtt_url: str
    managed_broker: bool

    @property
    def mqtt_host_port(self) -> tuple[str, int]:
        host, _, port = self.mqtt_url.partition("://")[2].rpartition(":")
        return host, int(port)


def advertised(settings: HubSettings, bound: Bound) -> tuple[str, str]:
    """The REST API's and the broker's addresses as devices and users are told them: the
    public ones when given, else the bound ones with a wildcard host (0.0.0.0, which means
    nothing to a device) replaced by this machine's name."""
    machine = socket.gethostname()

    def reachable(url: str) -> str:
        parts = urlsplit(url)
        if parts.hostname not in UNSPECIFIED:
            return url
        return parts._replace(netloc=f"{machine}:{parts.port}").geturl()

    api_url = settings.public_url.rstrip("/") if settings.public_url else reachable(bound.api_url)
    if settings.mqtt_public_url:
        return api_url, settings.mqtt_public_url.rstrip("/")
    mqtt = urlsplit(bound.mqtt_url)
    if settings.public_url and mqtt.hostname in UNSPECIFIED | {"127.0.0.1", "localhost"}:
        host = urlsplit(settings.public_url).hostname
        return api_url, mqtt._replace(netloc=f"{host}:{mqtt.port}").geturl()
    return api_url, reachable(bound.mqtt_url)


def _advertised_hosts(settings: HubSettings) -> list[str | None]:
    """The host names `advertised` may hand out, for the server certificate."""
    public = [settings.public_url, settings.mqtt_public_url]
    return [urlsplit(url).hostname for url in public if url] + (
        [socket.gethostname()] if settings.host in UNSPECIFIED else [])


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def open_blobs(settings: HubSettings) -> BlobStore:
    """The blob store the settings name: a directory, or a bucket with a local cache."""
    location = settings.blob_location
    if location is None:
        return FileBlobStore(settings.blob_dir)
    credentials = Credentials.from_environment(os.environ)
    return S3BlobStore(S3Client(location, credentials), settings.blob_dir,
                       settings.blob_cache_mb << 20)


def initialise(settings: HubSettings, say: Callable[[str], None]) -> HubState:
    """Create what a first start needs; later starts find it and reuse it."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(settings.database)
    blobs = open_blobs(settings)

    ring = KeyRing(settings.signing_key_path)
    if ring.created:
        say(f"Created the hub's signing key: {settings.signing_key_path} (mode 0600)")
    if ring.unfinished:  # stopped in the middle of a rotation: finish it
        count = ring.finish(lambda old, new: packages.countersign_all(db, blobs, old, new))
        desired.forget_published(db)  # every device gets its state signed by the new key
        say(f"Finished the interrupted key rotation to {ring.key_id} ({count} package(s) "
            "signed again)")

    if not settings.admin_token_path.exists():
        _, secret = tokens.create(db, name="admin", role="admin", created_by="hub")
        write_secret(settings.admin_token_path, secret + "\n")
        say(f"Created an admin API token in {settings.admin_token_path} (mode 0600)")
    return HubState(
        settings=settings,
        db=db,
        blobs=blobs,
        keys=ring,
        mqtt_url=settings.mqtt_url or "",
        uploads=Uploads(blobs),
    )


def lock_data_dir(settings: HubSettings) -> int:
    """Take DATA/hub.lock for this process's lifetime (the descriptor is returned to keep):
    two hubs on one data dir would run two rollout engines on one database."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.data_dir.chmod(0o700)  # one made before (or by hand) may be world-readable
    path = settings.data_dir / "hub.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(f"error: another hub (pid {holder}) is using {settings.data_dir}; "
                         "stop it, or give this one another --data-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def check_port(host: str, port: int, flag: str) -> None:
    """SystemExit naming FLAG when HOST:PORT is taken: said before anything is announced."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and Mosquitto do
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise SystemExit(f"error: port {port} on {host} is taken; stop what uses it, "
                             f"or choose another with {flag}") from None


def bind(settings: HubSettings) -> Bound:
    port = settings.port or free_port(settings.host)
    api = f"{'http' if settings.insecure else 'https'}://{settings.host}:{port}"
    if settings.mqtt_url:
        return Bound(api, settings.mqtt_url, managed_broker=False)
    mqtt_port = settings.mqtt_port or free_port(settings.host)
    scheme = "mqtt" if settings.insecure else "mqtts"
    return Bound(api, f"{scheme}://{settings.host}:{mqtt_port}", True)


@dataclass(frozen=True)
class Transport:
    """The files TLS is served with (hub/pki.py)."""

    authority: pki.Authority  # signs the broker's client certificates
    certfile: Path
    keyfile: Path
    trust_pem: str  # what clients pin and verify the server with
    trust_path: Path  # ... as a file


def transport(settings: HubSettings, say: Callable[[str], None]) -> Transport | None:
    """The CA (made on first start), and the server certificate; None with --insecure."""
    if settings.insecure:
        return None
    made = not (settings.tls_dir / "ca.key").exists()
    authority = pki.Authority(settings.tls_dir)
    if made:
        say(f"Created the hub's certificate authority: {authority.paths.ca_cert} "
            f"(key mode 0600)")
    if settings.tls_cert and settings.tls_key:
        certfile, keyfile = Path(settings.tls_cert), Path(settings.tls_key)
        try:
            trust = pki.trust_anchor(certfile)
        except (OSError, tls.TlsError) as exc:
            raise SystemExit(f"error: --tls-cert: {exc}") from None
        trust_path = settings.tls_dir / "trust.pem"
        write_atomic(trust_path, trust.encode())
    else:
        authority.server_certificate(pki.server_hosts(settings.host, *_advertised_hosts(settings)))
        certfile, keyfile, trust = (authority.paths.server_cert, authority.paths.server_key,
                                    authority.pem)
        trust_path = authority.paths.ca_cert
    # The hub's own broker identity, made afresh each start.
    # Its common name is its broker login: not guessable (hub/broker_config.py says why).
    authority.key_and_certificate(authority.paths.hub_key, authority.paths.hub_cert,
                                  hub_username(hub_secret(settings.mqtt_secret_path)),
                                  days=pki.SERVER_DAYS)
    return Transport(authority, certfile, keyfile, trust, trust_path)


class _Server(uvicorn.Server):
    """uvicorn re-raises a caught SIGTERM after shutdown, so the process would
    end "killed by signal"; we handle the signals ourselves and exit 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _stop(self) -> None:
        self.should_exit = True


class _MetricsServer(uvicorn.Server):
    """The --metrics-port listener: the API's server owns the signals and stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _managed_broker(state: HubState, bound: Bound,
                    served: Transport | None) -> ManagedBroker:
    """The broker, with its identities on STATE: certificates, or logins (--insecure)."""
    settings = state.settings
    host, port = bound.mqtt_host_port
    config = BrokerConfig(host=host, port=port, directory=settings.broker_dir,
                          max_queued_messages=settings.mqtt_max_queued_messages,
                          user=pwd.getpwuid(os.geteuid()).pw_name,
                          tls=BrokerTls(served.authority.paths.ca_cert, served.certfile,
                                        served.keyfile) if served else None)
    broker = ManagedBroker(config, prepare=lambda: identities.write_all(),
                           on_restart=lambda: _broker_lost_state(state),
                           mosquitto=find_mosquitto(settings.mosquitto))
    identities: BrokerCertificates | BrokerLogins
    if served is not None:
        pki.ensure_table(state.db)
        identities = state.certificates = BrokerCertificates(
            state.db, served.authority, config,
            hub_name=hub_username(hub_secret(settings.mqtt_secret_path)), reload=broker.reload)
    else:
        identities = state.broker = BrokerLogins(
            config, hub_password=hub_secret(settings.mqtt_secret_path),
            devices=lambda: devices.ids(state.db),
            reload=broker.reload)
    return broker


def _broker_lost_state(state: HubState) -> None:
    """The broker died and may come back without its retained desired states."""
    desired.forget_published(state.db)
    if state.fleet is not None:
        state.fleet.publisher.catch_up()


async def _run(state: HubState, bound: Bound, served: Transport | None) -> None:
    settings, broker = state.settings, None
    username, password = settings.mqtt_username, settings.mqtt_password
    if bound.managed_broker:
        broker = _managed_broker(state, bound, served)
        # With TLS the hub's certificate is its identity; else its secret in the data dir.
        password = None if served else hub_secret(settings.mqtt_secret_path)
        username = None if served else hub_username(hub_secret(settings.mqtt_secret_path))
        await asyncio.to_thread(broker.start)
        if broker.lost_state:  # a first start, or its saved state is gone: publish everything
            desired.forget_published(state.db)
    fleet = state.fleet = FleetLink(
        state.db, state.keys, mqtt_url=bound.mqtt_url, username=username,
        password=password, validity=timedelta(days=settings.desired_validity_days),
        heartbeat=settings.heartbeat_seconds,
        broker_status=broker.status if broker is not None else None,
        # On PostgreSQL other hubs may share the broker: each needs a client id of its own
        # (kept across restarts, so its persistent session is found again).
        replica=(hub_username(hub_secret(settings.mqtt_secret_path))
                 if state.db.dialect.name == "postgresql" else None),
    )
    if bound.mqtt_url.startswith("mqtts://") and served is not None:
        paths = served.authority.paths
        fleet.session.use_tls(tls.client_context(served.trust_path, paths.hub_cert,
                                                 paths.hub_key))
    fleet.start()
    # The jobs that must run once per fleet; of several replicas, on the leader only.
    leader = Leader(state.db)
    engine = state.rollouts = RolloutEngine(state.db, fleet.notify, leads=leader.held)
    engine.start()
    retention = state.retention = Retention(state.db, settings.retention, leads=leader.held)
    retention.start()
    liveness = state.liveness = Liveness(
        state.db, receiving=fleet.receiving, interval=settings.heartbeat_seconds,
        silent_for=timedelta(seconds=settings.heartbeat_seconds
                             * settings.device_offline_heartbeats), leads=leader.held)
    liveness.start()
    dispatcher = state.webhooks = Dispatcher(state.db, settings.webhook_policy,
                                             leads=leader.held)
    dispatcher.start()
    drift_watch = DriftWatch(state.db, interval=settings.drift_interval_seconds,
                             leads=leader.held)
    drift_watch.start()
    # PostgreSQL's planner needs row counts that keep up with a fleet's tables, faster
    # than autovacuum takes them (hub/storage/dialect.py); SQLite's does not.
    statistics = Periodic("planner-statistics", state.db.refresh_statistics, interval=2.0,
                          leads=leader.held)
    if state.db.dialect.name == "postgresql":
        statistics.start()
    host, _, port = bound.api_url.partition("://")[2].rpartition(":")
    config = uvicorn.Config(
        create_app(state), host=host, port=int(port), log_level="info", access_log=False,
        ssl_certfile=served.certfile if served else None,
        ssl_keyfile=served.keyfile if served else None,
    )
    scraped = None
    if settings.metrics_port:
        scraped = _MetricsServer(uvicorn.Config(
            metrics_app(state), host=host, port=settings.metrics_port, log_level="warning",
            access_log=False))
        scraping = asyncio.create_task(scraped.serve())
    server = _Server(config)
    state.stopping = lambda: server.should_exit
    try:
        await server.serve()
    finally:
        if scraped is not None:
            scraped.should_exit = True
            await scraping
        await asyncio.to_thread(engine.stop)
        await asyncio.to_thread(retention.stop)
        await asyncio.to_thread(liveness.stop)
        await asyncio.to_thread(dispatcher.stop)
        await asyncio.to_thread(drift_watch.stop)
        await asyncio.to_thread(statistics.stop)
        await asyncio.to_thread(leader.release)  # another replica may take the lead at once
        await asyncio.to_thread(fleet.stop)
        if broker is not None:
            await asyncio.to_thread(broker.stop)


def serve(settings: HubSettings, say: Callable[[str], None] = print) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    bound = bind(settings)
    if bound.managed_broker:
        try:  # before anything is created: one line, no traceback
            find_mosquitto(settings.mosquitto)
        except BrokerError as exc:
            raise SystemExit(f"error: {exc}") from None
    lock = lock_data_dir(settings)  # held until the process ends
    check_port(settings.host, int(bound.api_url.rpartition(":")[2]), "--port")
    if bound.managed_broker:
        check_port(settings.host, int(bound.mqtt_url.rpartition(":")[2]), "--mqtt-port")
    if settings.metrics_port:
        check_port(settings.host, settings.metrics_port, "--metrics-port")
    state = initialise(settings, say)
    api_url, state.mqtt_url = advertised(settings, bound)
    served = transport(settings, say)
    if served is None:
        log.warning("--insecure: REST and MQTT are PLAIN TEXT with no certificates; anyone on "
                    "the network can read and change tokens, packages and desired states")
    else:
        state.trust_pem = served.trust_pem
    broker_kind = "managed Mosquitto" if bound.managed_broker else "external broker"
    say(f"REST API on {api_url} (OpenAPI docs at {api_url}/docs)")
    say(f"MQTT on {state.mqtt_url} ({broker_kind}; the address devices get)")
    if settings.metrics_port:
        say(f"Metrics on http://{settings.host}:{settings.metrics_port}/metrics (no token)")
    say(
        f"Log in with: edgefleet login --hub {api_url}"
        f" --token-file {settings.admin_token_path}"
        + (f" --ca {served.trust_path}" if served else "")
    )
    if served is not None:
        say(f"TLS: clients trust {served.trust_path} "
            f"(sha256 {tls.fingerprint(served.trust_pem)})")
    try:
        asyncio.run(_run(state, bound, served))
    except BrokerError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        os.close(lock)
