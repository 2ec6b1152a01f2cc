"""`edgefleet hub serve`: first-start setup, then the broker, the REST API and the fleet link.

Unless an external broker is named (--mqtt-url), the hub starts Mosquitto
and keeps it running (hub/broker.py) and manages its device logins
(hub/broker_logins.py). The REST API (uvicorn) runs on the asyncio loop; the
fleet link (hub/fleet.py: ingest and desired-state publishing) and the
broker's supervisor run in threads of their own. SIGINT/SIGTERM stop
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

import uvicorn

from contract import signing
from contract.files import write_secret
from hub import desired, devices, tokens
from hub.api.app import create_app
from hub.api.state import HubState
from hub.broker import BrokerError, ManagedBroker, find_mosquitto, hub_secret
from hub.broker_config import BrokerConfig, hub_username
from hub.broker_logins import BrokerLogins
from hub.fleet import FleetLink
from hub.oci_registry import Uploads
from hub.rollout_engine import RolloutEngine
from hub.settings import HubSettings
from hub.storage.blobs import FileBlobStore
from hub.storage.db import Database

log = logging.getLogger("edgefleet.hub")


@dataclass(frozen=True)
class Bound:
    """The ports actually in use (a setting of 0 means "pick a free one")."""

    api_url: str
    mqtt_url: str
    managed_broker: bool


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def initialise(settings: HubSettings, say: Callable[[str], None]) -> HubState:
    """Create what a first start needs; later starts find it and reuse it."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(settings.db_path)
    blobs = FileBlobStore(settings.blob_dir)

    if not settings.signing_key_path.exists():
        signing.write_private_key(signing.generate_private_key(), settings.signing_key_path)
        say(f"Created the hub's signing key: {settings.signing_key_path} (mode 0600)")
    key = signing.load_private_key(settings.signing_key_path)

    if not settings.admin_token_path.exists():
        _, secret = tokens.create(db, name="admin", role="admin", created_by="hub")
        write_secret(settings.admin_token_path, secret + "\n")
        say(f"Created an admin API token in {settings.admin_token_path} (mode 0600)")
    return HubState(
        settings=settings,
        db=db,
        blobs=blobs,
        signing_key=key,
        signing_public_key=signing.public_key_pem(key),
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
    if settings.mqtt_url:
        return Bound(f"http://{settings.host}:{port}", settings.mqtt_url, managed_broker=False)
    mqtt_port = settings.mqtt_port or free_port(settings.host)
    return Bound(
        f"http://{settings.host}:{port}", f"mqtt://{settings.host}:{mqtt_port}", True
    )


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


def _managed_broker(state: HubState, bound: Bound,
                    password: str) -> tuple[ManagedBroker, BrokerLogins]:
    settings = state.settings
    host, _, port = bound.mqtt_url.removeprefix("mqtt://").rpartition(":")
    config = BrokerConfig(host=host, port=int(port), directory=settings.broker_dir,
                          max_queued_messages=settings.mqtt_max_queued_messages,
                          user=pwd.getpwuid(os.geteuid()).pw_name)
    broker = ManagedBroker(config, prepare=lambda: logins.write_all(),
                           on_restart=lambda: _broker_lost_state(state),
                           mosquitto=find_mosquitto(settings.mosquitto))
    logins = BrokerLogins(config, hub_password=password, devices=lambda: devices.ids(state.db),
                          reload=broker.reload)
    return broker, logins


def _broker_lost_state(state: HubState) -> None:
    """The broker died and may come back without its retained desired states."""
    desired.forget_published(state.db)
    if state.fleet is not None:
        state.fleet.publisher.catch_up()


async def _run(state: HubState, bound: Bound) -> None:
    settings, broker = state.settings, None
    username, password = settings.mqtt_username, settings.mqtt_password
    if bound.managed_broker:
        password = hub_secret(settings.mqtt_secret_path)
        username = hub_username(password)
        broker, state.broker = _managed_broker(state, bound, password)
        await asyncio.to_thread(broker.start)
        if broker.lost_state:  # a first start, or its saved state is gone: publish everything
            desired.forget_published(state.db)
    fleet = state.fleet = FleetLink(
        state.db, state.signing_key, mqtt_url=bound.mqtt_url, username=username,
        password=password, validity=timedelta(days=settings.desired_validity_days),
        heartbeat=settings.heartbeat_seconds,
        broker_status=broker.status if broker is not None else None,
    )
    fleet.start()
    engine = state.rollouts = RolloutEngine(state.db, fleet.notify)
    engine.start()
    host, _, port = bound.api_url.removeprefix("http://").rpartition(":")
    config = uvicorn.Config(
        create_app(state), host=host, port=int(port), log_level="info", access_log=False
    )
    try:
        await _Server(config).serve()
    finally:
        await asyncio.to_thread(engine.stop)
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
    state = initialise(settings, say)
    state.mqtt_url = bound.mqtt_url
    broker_kind = "managed Mosquitto" if bound.managed_broker else "external broker"
    say(f"REST API on {bound.api_url} (OpenAPI docs at {bound.api_url}/docs)")
    say(f"MQTT on {bound.mqtt_url} ({broker_kind})")
    say(
        f"Log in with: edgefleet login --hub {bound.api_url}"
        f" --token-file {settings.admin_token_path}"
    )
    try:
        asyncio.run(_run(state, bound))
    except BrokerError as exc:
        raise SystemExit(f"error: {exc}") from None
    finally:
        os.close(lock)
