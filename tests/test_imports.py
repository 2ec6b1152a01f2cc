"""Dependencies point one way: every import in the tree, read from the source with `ast`
(imports inside functions too), is checked against one table, and the same table draws the
diagram in docs/architecture.md.

Run `python tests/test_imports.py` to print the diagram.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("contract", "packager", "agent", "hub", "edgefleet")
# The tests' helper modules (hubproc, modelgen...), importable by name from tests/ only.
TEST_HELPERS = frozenset(p.stem for p in (ROOT / "tests").glob("*.py"))
EVERYTHING = "*"
BUT_TESTS = "* but tests"

# Component -> what it may import besides itself: packages, or single modules of one.
RULES: dict[str, tuple[str, ...]] = {
    "contract": (),
    "packager": ("contract",),
    "agent": ("contract", "packager.distribution"),
    "hub": ("contract", "packager", "agent.mqtt", "agent.sketches"),
    "edgefleet": (EVERYTHING,),
    "bench": (BUT_TESTS,),
    "examples": (BUT_TESTS,),
    "tests": (EVERYTHING,),
}
WHY = {
    "contract": "the shared contract: stdlib and cryptography only",
    "packager": "builds packages in the contract's format",
    "agent": "the OCI registry client, not the build side",
    "hub": "the MQTT session both sides use; drift bins counted as devices count them",
    "edgefleet": "the composition root: assembles every command group",
}
def under(target: str, name: str) -> bool:
    """TARGET is NAME or something inside it ("agent.mqtt.Session" is under "agent.mqtt")."""
    return target == name or target.startswith(f"{name}.")


def diagram() -> str:
    """The table as text: one line per component, what it may import and why."""
    width = max(len(c) for c in RULES)
    lines = []
    for component, allowed in RULES.items():
        if component == "tests":
            continue
        if allowed == (BUT_TESTS,):
            target = "anything but tests/"
        elif allowed == (EVERYTHING,):
            target = "everything"
        else:
            target = ", ".join(allowed) or "(nothing of ours)"
        why = f"  ({WHY[component]})" if component in WHY else ""
        lines.append(f"{component:<{width}} -> {target}{why}")
    return "\n".join(lines)


def modules() -> Iterator[tuple[str, Path]]:
    """Every Python module of the tree, by dotted name (tests' helpers by their own name)."""
    for component in RULES:
        for path in sorted((ROOT / component).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def imports(name: str, path: Path) -> Iterator[str]:
    """What the module NAME at PATH imports, as dotted names ("pkg.module.attribute")."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield from (f"{base}.{alias.name}" for alias in node.names)


def component_of(name: str) -> str:
    return name.split(".")[0]


def allowed(importer: str, target: str) -> bool:
    component, top = component_of(importer), component_of(target)
    if top == component:
        return True
    rules = RULES[component]
    if top in TEST_HELPERS:
        return EVERYTHING in rules
    if top not in OURS and top not in RULES:
        return True  # the standard library or a third-party package
    if EVERYTHING in rules or BUT_TESTS in rules:
        return top != "tests"
    return any(under(target, rule) for rule in rules)


def test_every_import_follows_the_table() -> None:
    broken = sorted(
        f"{name} imports {target}"
        for name, path in modules()
        for target in imports(name, path)
        if not allowed(name, target)
    )
    assert broken == []


def test_the_shared_contract_needs_only_the_stdlib_and_cryptography() -> None:
    outside = sorted(
        f"{name} imports {target}"
        for name, path in modules()
        if component_of(name) == "contract"
        for target in imports(name, path)
        if component_of(target) not in {*sys.stdlib_module_names, "contract", "cryptography"}
    )
    assert outside == []


@pytest.mark.parametrize(
    ("importer", "target", "ok"),
    [
        ("agent.daemon", "packager.distribution.Registry", True),
        ("agent.daemon", "packager.build.build_package", False),
        ("agent.daemon", "hub.desired", False),
        ("packager.prepare", "agent.runtimes.get_runtime", False),
        ("contract.oci", "packager.tarball.write_tar", False),
        ("hub.fleet", "agent.mqtt.Session", True),
        ("hub.fleet", "agent.daemon.Agent", False),
        ("bench.rollout", "hub.cli.client", True),
        ("bench.rollout", "hubproc.start_hub", False),
        ("tests.test_x", "hubproc.start_hub", True),
        ("edgefleet.cli", "agent.cli.agent", True),
        ("contract.protocol", "json.loads", True),
    ],
)
def test_the_rules_read_as_the_table_says(importer: str, target: str, ok: bool) -> None:
    assert allowed(importer, target) == ok


def test_the_architecture_document_shows_the_table() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Parts and dependencies", 1)[1].split("\n## ", 1)[0]
    assert f"```\n{diagram()}\n```" in section, (
        "docs/architecture.md's dependency diagram is stale; paste the output of "
        "`python tests/test_imports.py` into its 'Parts and dependencies' section"
    )


if __name__ == "__main__":
    print(diagram())
