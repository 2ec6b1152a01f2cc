"""`python -m agent OPTIONS_JSON`: the agent daemon's own process.

`edgefleet agent run` checks its options, enrolls on the first start and
then execs this with the options as JSON (AgentOptions.to_json). A fresh
interpreter keeps the long-running daemon small: it never imports click or
the hub's CLI, and the enrollment's HTTP client is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys

from agent import identity as identities
from agent.daemon import Agent, AgentOptions

# httpx imports its command-line tool (click, rich, pygments: ~6 MB) with itself
# unless that import fails, which it handles; the daemon's registry client never
# needs it. A None entry in sys.modules makes the import fail.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m agent OPTIONS_JSON (started by `edgefleet agent run`)",
              file=sys.stderr)
        return 2
    options = AgentOptions.from_json(argv[1])
    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per registry request
    identity = identities.load(options.data_dir)
    if identity is None:
        print(f"{options.data_dir} holds no identity: run `edgefleet agent run --hub URL "
              "--token TOKEN` to enroll this device", file=sys.stderr)
        return 1
    if options.mqtt_url:
        identity = dataclasses.replace(identity, mqtt_url=options.mqtt_url)
    daemon = Agent(identity, options)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop_requested.set())
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
