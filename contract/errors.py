"""The errors about packages: raised by the contract's readers and checks (the OCI
format, signatures, verification) and by the packager, which builds on them.
Every message says what is wrong and, where there is one, what to do.

Stdlib only: the agent catches these when it checks a package.
"""

from __future__ import annotations


class PackageError(Exception):
    """Something about a package that cannot be done or is refused."""


class FormatError(PackageError):
    """Bytes or a directory that are not the OCI format the packager expects."""


class BlobNotFound(PackageError):
    """A blob source has no blob with the digest asked for."""


class RefNotFound(PackageError):
    """An image source has no tag (ref name) of the name asked for."""


class VerificationError(PackageError):
    """A package failed a check: a digest, a size, a signature, or how its parts fit together."""


class DiskFull(PackageError):
    """A download did not fit on the disk; what it had written was removed."""
