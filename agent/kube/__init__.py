"""Kubernetes mode: a cluster (or one namespace of it) as a deployment target.

- `manifests`  pure builders: a deployment's release -> Deployment + Service
- `inventory`  what the cluster offers, read from its API
- `apply`      server-side apply of the agent's own objects, drift, prune, undo
- `rollout`    a Deployment's rollout as an outcome: complete, progressing or failed

Only the official `kubernetes` client is used (the `k8s` extra); objects are
plain dicts as the API serves them, so the builders and readers are pure.
"""
