"""edgefleet's shared contract: what the hub, the packager and the agent must agree on.

Each definition both sides use lives here once: the MQTT wire protocol
(`protocol`), canonical JSON (`canonical`), keys and signatures (`signing`,
`cosign`), the OCI format and package verification (`oci`, `verify`), where a
package's files sit and what its serving.json says (`layers`, `serving`), the
tensor types of a model signature (`tensors`), the runtime/framework table
(`runtimes`), every name grammar (`names`), the errors these raise (`errors`)
and 0600 secret files (`files`).

It imports only the standard library, and `cryptography` where signing needs
it (loaded when something is signed or verified), so a device gets it with
nothing else. It imports nothing of hub/, agent/ or packager/; they import it
(tests/test_imports.py keeps both true).
"""
