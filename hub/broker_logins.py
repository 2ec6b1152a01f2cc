"""Device logins on the managed broker, changed while it runs.

`BrokerLogins` owns `DATA/broker/passwd`. A change rewrites it atomically,
asks Mosquitto to reload it (SIGHUP: no restart, every session stays) and
returns once the reload took effect, which it tells by logging in as the
canary, whose password each write changes. A reload that removes a login
drops that client's open connection. A reload checks every connected
client's login again, so it costs about the same for many changes as for
one; changes that arrive during a reload go together in the next.

Enrollment adds a device's login right after its row commits (an
enrollment the broker did not take is undone: 503, nothing kept);
deleting a device removes its login first. The file is the only place a
device's MQTT password exists (hashed; the database keeps its token as
sha256), so before every start of the broker `write_all` keeps the logins
of the devices that still exist and drops the rest.

Why not Mosquitto's dynamic-security plugin: Debian's 2.0.11 ships it and
it works, but it saves its whole JSON file after every change and expands
no `%u` in ACLs (a role per device). Measured with 10,000 devices
(bench/broker.py): 1.4 s per change and 120 MiB of broker memory for the
logins; here 0.1 s and 11 MiB, and ~1.1 s per reload once all 10,000 are
connected.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection

from contract.files import write_secret
from hub import broker_config
from hub.errors import HubError

log = logging.getLogger("edgefleet.hub.broker")


class BrokerUnavailable(HubError):
    status = 503
    error = "service unavailable"


def _field(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def logs_in(host: str, port: int, username: str, password: str, timeout: float) -> bool:
    """Does the broker accept this login? An MQTT 3.1.1 CONNECT with a clean
    session, so it leaves nothing behind."""
    body = (_field("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 0)
            + _field(username) + _field(username) + _field(password))
    assert len(body) < 128  # one byte of remaining length
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        answer = sock.recv(4)
        if answer == b"\x20\x02\x00\x00":
            sock.sendall(b"\xe0\x00")  # DISCONNECT
            return True
        return False


class BrokerLogins:
    def __init__(
        self, config: broker_config.BrokerConfig, *, hub_password: str,
        devices: Callable[[], Collection[str]], reload: Callable[[], bool],
        timeout: float = 10,
    ) -> None:
        """DEVICES answers the ids of the devices that exist (the database);
        RELOAD asks the running broker to read its files again (False: it is
        not running)."""
        self.config = config
        self._hub_password = hub_password
        self._devices = devices
        self._reload = reload
        self._timeout = timeout
        self._lock = threading.Lock()  # one writer of the file at a time
        self._canary = ""
        self._batches = threading.Condition()  # guards what follows
        self._pending: dict[str, str | None] = {}  # the next batch: device -> hash, None: remove
        self._next_batch = 0
        self._applying = False
        self._results: dict[int, str | None] = {}  # batch -> None (done) or what went wrong

    def write_all(self) -> None:
        """Before the broker starts: every file, with the logins of devices that exist."""
        with self._lock:
            logins = self._read()
            devices = set(self._devices())
            kept = broker_config.device_logins(logins, devices)
            missing = devices - set(kept)
            if missing:
                log.warning("%d device(s) have no broker login and cannot connect (enrolled "
                            "before the managed broker, or its passwd file was lost): enroll "
                            "them again, e.g. %s", len(missing), ", ".join(sorted(missing)[:5]))
            self._write(kept)
            write_secret(self.config.acl_path,
                         broker_config.acl(broker_config.hub_username(self._hub_password)))
            write_secret(self.config.directory / "mosquitto.conf",
                          broker_config.mosquitto_conf(self.config))

    def add_device(self, device_id: str, password: str) -> None:
        hashed = broker_config.password_line(device_id, password, os.urandom(12))
        self._apply({device_id: hashed.split(":", 1)[1]}, f"add the broker login of {device_id}")

    def remove_device(self, device_id: str) -> None:
        """Remove its login and drop its connection; a login already gone is no error."""
        self._apply({device_id: None}, f"remove the broker login of {device_id}")

    def _apply(self, change: dict[str, str | None], what: str) -> None:
        """Make CHANGE (device -> hashed password, or None to remove) and return
        once the broker uses it. Changes that arrive while a reload is under
        way wait and go together in the next one: a reload costs about the
        same for one change as for many (it checks every connected client's
        login again: ~1 s with 10,000 connected)."""
        with self._batches:
            self._pending.update(change)
            mine = self._next_batch
            while mine not in self._results:
                if self._applying:
                    self._batches.wait()
                    continue
                self._applying, batch, self._pending = True, self._pending, {}
                number, self._next_batch = self._next_batch, self._next_batch + 1
                self._batches.release()
                error: str | None = "writing the broker's logins failed"
                try:
                    error = self._reload_with(batch)
                finally:
                    self._batches.acquire()
                    self._applying = False
                    self._results[number] = error
                    self._results.pop(number - 100, None)  # waiters of old batches are gone
                    self._batches.notify_all()
            error = self._results[mine]
        if error is not None:
            raise BrokerUnavailable(f"could not {what}: {error}; see the hub's log, then "
                                    "try again")

    def _reload_with(self, batch: dict[str, str | None]) -> str | None:
        """Write BATCH into the file, reload, wait for it: None, or what went wrong."""
        with self._lock:
            logins = self._read()
            for device, hashed in batch.items():
                if hashed is None:
                    logins.pop(device, None)
                else:
                    logins[device] = hashed
            self._write(logins)
            canary = self._canary
        if not self._reload():
            return "the broker is not running (it is being restarted)"
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            try:
                if logs_in(self.config.host, self.config.port, broker_config.CANARY_USERNAME,
                           canary, timeout=max(deadline - time.monotonic(), 0.1)):
                    return None
            except OSError:
                pass
            time.sleep(0.01)
        return f"the broker did not reload its logins within {self._timeout:g} s"

    def _read(self) -> dict[str, str]:
        path = self.config.password_path
        return broker_config.parse_password_file(path.read_text()) if path.exists() else {}

    def _write(self, logins: dict[str, str]) -> None:
        self._canary = secrets.token_urlsafe(16)
        write_secret(self.config.password_path, broker_config.password_file(
            logins, hub_password=self._hub_password, canary=self._canary))
