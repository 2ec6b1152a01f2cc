"""`python -m agent.kube OPTIONS_JSON`: the agent daemon in Kubernetes mode.

`edgefleet agent run --mode kubernetes` checks its options, enrolls on the
first start and execs this (as agent/__main__.py for a device). The API
server may be away when the agent starts: it waits for it with backoff
(before connecting to the broker: the inventory it reports comes from the
API server) rather than exit, since a pod that exits only restarts to wait
again. A kubeconfig that cannot be read is an exit with its one line.

`EDGEFLEET_KUBE_METRICS_URL` (tests only, as EDGEFLEET_AGENT_PAUSE_IN) reads
every pod's metrics from that URL instead of the pod's IP: the test API
server's pods (kwok's) run no process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time

from agent import identity as identities
from agent.inventory import agent_version
from agent.kube.apply import KubeError
from agent.kube.daemon import KubeAgent, KubeOptions, api_client
from agent.kube.inventory import read_inventory
from agent.kube.scrape import Addresses, PodAddress

log = logging.getLogger("edgefleet.agent")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m agent.kube OPTIONS_JSON (started by `edgefleet agent run "
              "--mode kubernetes`)", file=sys.stderr)
        return 2
    options = KubeOptions.from_json(argv[1])
    logging.basicConfig(level=logging.DEBUG if options.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A retry line per attempt while the API server is away; KubeError says it once.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    identity = identities.load(options.data_dir)
    if identity is None:
        print(f"{options.data_dir} holds no identity: run `edgefleet agent run --mode kubernetes "
              "--hub URL --token TOKEN` to enroll this cluster", file=sys.stderr)
        return 1
    if options.mqtt_url:
        identity = dataclasses.replace(identity, mqtt_url=options.mqtt_url)
    try:
        api = api_client(options.kubeconfig)
    except KubeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    delay = 1.0
    while True:
        try:
            inventory = read_inventory(api)
            break
        except KubeError as exc:
            log.error("cannot read the cluster's inventory (%s); again in %.0f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 60)
    daemon = KubeAgent(identity, options, api, inventory, agent_version())
    metrics_url = os.environ.get("EDGEFLEET_KUBE_METRICS_URL")
    if metrics_url:
        daemon.scraper.addresses = _at(metrics_url, daemon.ns.metrics_addresses)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop_requested.set())
    daemon.run()
    return 0


def _at(url: str, pods: Addresses) -> Addresses:
    """PODS as the API server lists them, each read at URL."""
    return lambda name: [PodAddress(p.pod, url) for p in pods(name)]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
