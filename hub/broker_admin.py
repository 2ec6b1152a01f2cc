"""Device logins on the running managed broker, through its dynamic-security plugin.

One MQTT session (user `edgefleet-admin`) sends the plugin's commands to
`$CONTROL/dynamic-security/v1` and reads its answers, one request at a time.
Enrollment adds a device's login before its database row commits (so an
enrollment the broker did not take is rolled back, 503); deleting a device
removes its login first, and the broker drops its open connection. Both
take effect at once, with no restart. The plugin saves its file after each
change, so the logins outlive the broker.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from typing import Any

from agent.mqtt import MqttError, Session
from hub import broker_config
from hub.errors import HubError

log = logging.getLogger("edgefleet.hub.broker")


class BrokerUnavailable(HubError):
    status = 503
    error = "service unavailable"


class BrokerAdmin:
    def __init__(self, url: str, *, password: str, timeout: float = 10) -> None:
        self._session = Session(url, client_id=broker_config.ADMIN_CLIENT_ID,
                                username=broker_config.ADMIN_USERNAME, password=password,
                                subscriptions=[broker_config.RESPONSE_TOPIC], inbox_size=100)
        self._timeout = timeout
        self._lock = threading.Lock()  # one request in flight: answers are matched in order
        self._ids = itertools.count(1)

    def start(self) -> None:
        self._session.start()

    def close(self) -> None:
        self._session.close()

    def add_device(self, device_id: str, password: str) -> None:
        self._request(broker_config.device_commands(device_id, password),
                      f"add the broker login of {device_id}")

    def remove_device(self, device_id: str) -> None:
        """Remove its login and drop its connection; a login already gone is no error."""
        self._request(broker_config.removal_commands(device_id),
                      f"remove the broker login of {device_id}", absent_ok=True)

    def _request(self, commands: list[dict[str, Any]], what: str, *,
                 absent_ok: bool = False) -> None:
        with self._lock:
            deadline = time.monotonic() + self._timeout
            tag = f"edgefleet-{next(self._ids)}"
            tagged = [{**c, "correlationData": f"{tag}-{i}"} for i, c in enumerate(commands)]
            try:
                self._session.publish(broker_config.CONTROL_TOPIC,
                                      json.dumps({"commands": tagged}).encode(),
                                      timeout=self._timeout)
                answers = self._answers(tag, len(commands), deadline)
            except MqttError as exc:
                raise BrokerUnavailable(f"could not {what}: the broker did not answer ({exc}); "
                                        "see the hub's log, then try again") from None
        errors = [a["error"] for a in answers if a.get("error")
                  and not (absent_ok and "not found" in str(a["error"]).lower())]
        if errors:
            log.error("the broker refused to %s: %s", what, "; ".join(map(str, errors)))
            raise BrokerUnavailable(f"could not {what}: the broker said {errors[0]!r}")

    def _answers(self, tag: str, count: int, deadline: float) -> list[dict[str, Any]]:
        """The plugin's answers to request TAG; answers to older, timed-out
        requests are passed over."""
        while True:
            message = self._session.get(max(deadline - time.monotonic(), 0.001))
            try:
                responses = json.loads(message.payload)["responses"]
            except (ValueError, KeyError, TypeError):
                continue
            mine = [r for r in responses if isinstance(r, dict)
                    and str(r.get("correlationData", "")).startswith(tag + "-")]
            if len(mine) == count:
                return mine
