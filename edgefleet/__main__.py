"""`python -m edgefleet`: the same as the `edgefleet` console script."""

from edgefleet.cli import main

main()
