"""`edgefleet serve`: the device's scoring server (the agent's data plane).

One process serves the Open Inference Protocol (KServe V2) REST API on TCP
(and, with --grpc-port, its gRPC API) and a small control API for the agent
on a unix socket; all on one asyncio loop (uvicorn, grpcio's asyncio server).
The event loop mostly moves bytes: decoding, validation, inference and
encoding run in a thread pool sized to the concurrency limit, since the
runtimes release the GIL while they compute (small, fast requests excepted:
see scoring.py).

Modules, one job each:

    datatypes   V2 datatype names <-> numpy dtypes
    codec       wire framing: the binary tensor extension and BYTES encoding
    tensors     request inputs checked against a model's signature; outputs out
    errors      the errors a request can end with, each with its HTTP status
    metrics     Prometheus counters, gauges, histograms and their text format
    telemetry   the metrics this process exports
    limits      bounded concurrency; waiting bounded by count and by a wait budget
    batching    concurrent requests to one version merged into one runtime call
    table       loaded versions (reference counted) and the deployment routes
    loading     what the agent asks to load, and the one call into agent.runtimes
    upstream    a version served by a container on loopback, proxied (container mode)
    shadow      mirrored requests to a candidate, bounded and dropped under load
    scoring     one inference request from bytes in to bytes out, any wire format
    auth        the API key check
    app         the OIP REST routes and /metrics
    control     the agent's control API
    oip/        the gRPC API: oip.proto, its compiled descriptor, messages, wire, service
    sockets     the scoring port's listening socket (the agent binds it alike)
    server      both uvicorn servers in one loop; clean exit on SIGTERM/SIGINT
    cli         the `serve` click command
"""
