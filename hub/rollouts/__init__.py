"""Rollouts: one model version taken to a target of devices in waves.

A rollout's devices are the ones matching its tag selector, put in a
deterministic order (sha256 of rollout id and device id, which spreads each
wave across sites and kinds of device) and cut into cumulative waves
("5%,25%,100%" or "10,100,all"). All its state is in the database.

    spec.py      the options, their defaults and help; the typed spec checked at create
    states.py    rollout and device states, and the tables that move them
    store.py     rollout rows: load with the typed spec, transition, target devices
    commands.py  create (everything checkable refused here), pause, resume, abort, roll back
    reads.py     the list, and one rollout with its progress and soak
    engine.py    the tick, each rollout's step isolated from the others'
    health.py    the health judgement from inference telemetry

What counts as a device's answer:

- A report about the new version counts (serving, failed) only once the
  device has applied its newest desired state; before that it may be left
  over from an earlier attempt at the same version.
- A device failed for not answering within the device timeout is still
  followed: if it comes back and serves, it counts as serving.
- A device another rollout takes over (higher priority) is "skipped" with
  the reason; so is one a lower-priority rollout finds held. Once a rollout
  has completed or been aborted, what its devices served stays as it was.
- A joiner is taken in by the newest rollout of the deployment that
  targets it, not by older ones it supersedes.
"""
