"""`edgefleet serve`: the device's scoring server (the agent's data plane).

One process serves the Open Inference Protocol (KServe V2) REST API on TCP
and a small control API for the agent on a unix socket; both are uvicorn
servers on one asyncio loop. The event loop only moves bytes: decoding,
validation, inference and encoding run in a thread pool sized to the
concurrency limit, since the runtimes release the GIL while they compute.

Modules, one job each:

    datatypes   V2 datatype names <-> numpy dtypes
    codec       wire framing: the binary tensor extension and BYTES encoding
    tensors     request inputs checked against a model's signature; outputs out
    errors      the errors a request can end with, each with its HTTP status
    metrics     Prometheus counters, gauges, histograms and their text format
    telemetry   the metrics this process exports
    limits      bounded concurrency with a bounded wait queue
    table       loaded versions (reference counted) and the deployment routes
    loading     what the agent asks to load, and the one call into agent.runtimes
    upstream    a version served by a container on loopback, proxied (container mode)
    shadow      mirrored requests to a candidate, bounded and dropped under load
    scoring     one inference request from bytes in to bytes out
    auth        the API key check
    app         the OIP REST routes and /metrics
    control     the agent's control API
    server      both uvicorn servers in one loop; clean exit on SIGTERM/SIGINT
    cli         the `serve` click command
"""
