"""Container mode: the package's image run by a container engine (podman or Docker).

`images` checks a package in the hub's registry before the engine pulls it;
`engine` is the driver (pull, run, find, status, stop) over the Docker API;
`store` and `serving` are what the update state machine (agent/updates.py)
drives in container mode; `watch` looks after the engine and the containers
between updates.
"""
