"""The managed broker: what a login change costs at runtime, and the broker's memory.

    .venv/bin/python bench/broker.py              # 10,000 logins and connections, ~1-2 min
    .venv/bin/python bench/broker.py --quick      # 1,000

Runs the hub's own ManagedBroker (Mosquitto with its dynamic-security
plugin) and BrokerAdmin on loopback in a temporary directory; no hub.

Rows:

- `$CONTROL round trip, no change`: a plugin command that changes nothing
  (getDefaultACLAccess). The baseline: MQTT publish, the plugin, the answer.
- `add a device login` / `remove a device login` with N logins present:
  the plugin saves its whole file after each change, so this grows with N;
  the ratio to the baseline is that cost. Enrollment holds the database's
  write lock for one `add` (hub/devices.py `enroll(grant=)`).
- `broker RSS`: idle with the hub's logins only, with N logins loaded, and
  with C devices connected (MQTT 3.1.1 CONNECTs with their own logins over
  raw sockets, each holding its connection), per connection.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub import broker_config  # noqa: E402
from hub.broker import ManagedBroker, find_mosquitto, find_plugin  # noqa: E402
from hub.broker_admin import BrokerAdmin  # noqa: E402
from hub.broker_config import BrokerConfig  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def existing_logins(count: int) -> tuple[dict[str, object], dict[str, str]]:
    """A logins file as the plugin would have saved it, with COUNT devices."""
    tokens = {f"dev-{i:06d}": f"efd_bench{i}" for i in range(count)}
    clients = []
    for device, token in tokens.items():
        salt = os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", token.encode(), salt, 101)
        clients.append({"username": device, "password": base64.b64encode(digest).decode(),
                        "salt": base64.b64encode(salt).decode(), "iterations": 101})
    return {"clients": clients}, tokens


def _field(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connect(port: int, device: str, token: str) -> socket.socket:
    body = (_field("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 0)  # user, password, clean
            + _field(device) + _field(device) + _field(token))
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"\x10" + _length(len(body)) + body)
    answer = sock.recv(4)
    if answer != b"\x20\x02\x00\x00":
        raise RuntimeError(f"{device} was refused: CONNACK {answer!r}")
    return sock


def timed(action: object, samples: int) -> float:
    """Median milliseconds of ACTION()."""
    times = []
    for i in range(samples):
        started = time.perf_counter()
        action(i)  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logins", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="1,000 logins and connections")
    args = parser.parse_args()
    if args.quick:
        args.logins = args.connections = 1000
    mosquitto = find_mosquitto()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "broker"
        directory.mkdir()
        logins, tokens = existing_logins(args.logins)
        (directory / "dynamic-security.json").write_text(json.dumps(logins))
        port = free_port()
        config = BrokerConfig(host="127.0.0.1", port=port, directory=directory,
                              plugin=find_plugin(mosquitto), max_queued_messages=100_000,
                              user=psutil.Process().username())

        # Idle, hub logins only: the same broker files without the devices.
        empty = ManagedBroker(config, hub_password="bench", devices=set, on_restart=lambda: None,
                              mosquitto=mosquitto)
        empty.start()
        time.sleep(0.5)
        idle = psutil.Process(empty.status()["pid"]).memory_info().rss
        empty.stop()
        (directory / "dynamic-security.json").write_text(json.dumps(logins))

        broker = ManagedBroker(config, hub_password="bench", devices=lambda: set(tokens),
                               on_restart=lambda: None, mosquitto=mosquitto)
        broker.start()
        process = psutil.Process(broker.status()["pid"])
        time.sleep(0.5)
        loaded = process.memory_info().rss
        admin = BrokerAdmin(broker.url, password="bench", timeout=60)
        admin.start()
        try:
            baseline = timed(lambda i: admin._request(  # noqa: SLF001
                [{"command": "getDefaultACLAccess"}], "read"), args.samples)
            add = timed(lambda i: admin.add_device(f"dev-new{i}", f"efd_new{i}"), args.samples)
            remove = timed(lambda i: admin.remove_device(f"dev-new{i}"), args.samples)
            n = f"{args.logins:,}"
            rows += [
                ("$CONTROL round trip, no change", f"{baseline:.1f} ms", "1.0 (baseline)"),
                (f"add a device login ({n} present)", f"{add:.1f} ms", f"{add / baseline:.1f}"),
                (f"remove a device login ({n} present)", f"{remove:.1f} ms",
                 f"{remove / baseline:.1f}"),
            ]
            started = time.perf_counter()
            held = [mqtt_connect(port, device, token)
                    for device, token in list(tokens.items())[:args.connections]]
            took = time.perf_counter() - started
            time.sleep(1)
            connected = process.memory_info().rss
            for sock in held:
                sock.close()
        finally:
            admin.close()
            broker.stop()
    mib = 2**20
    rows += [
        ("broker RSS, idle (hub logins only)", f"{idle / mib:.1f} MiB", ""),
        (f"broker RSS, {args.logins:,} logins loaded", f"{loaded / mib:.1f} MiB",
         f"{loaded / idle:.1f} x idle"),
        (f"broker RSS, {len(held):,} devices connected", f"{connected / mib:.1f} MiB",
         f"{(connected - loaded) / max(len(held), 1) / 1024:.1f} KiB per connection"),
        (f"{len(held):,} CONNECTs one after another", f"{took:.1f} s",
         f"{len(held) / took:,.0f} logins/s"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"Managed broker (Mosquitto with dynamic security), load {os.getloadavg()[0]:.1f}")
    for name, value, ratio in rows:
        print(f"  {name:<{width}}  {value:>12}  {ratio}")


if __name__ == "__main__":
    main()
