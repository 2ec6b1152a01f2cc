"""The packager's errors. Every message says what is wrong and, where there is one, what to do.

Stdlib only: the agent catches these when it checks a package.
"""

from __future__ import annotations


class PackagerError(Exception):
    """Something the packager cannot do or refuses to do."""


class FormatError(PackagerError):
    """Bytes or a directory that are not the OCI format the packager expects."""


class BlobNotFound(PackagerError):
    """A blob source has no blob with the digest asked for."""


class RefNotFound(PackagerError):
    """An image source has no tag (ref name) of the name asked for."""


class PlatformUnavailable(PackagerError):
    """One platform cannot be built (no wheel, no base image for it); the others may be."""


class VerificationError(PackagerError):
    """A package failed a check: a digest, a size, a signature, or how its parts fit together."""


class DiskFull(PackagerError):
    """A download did not fit on the disk; what it had written was removed."""
