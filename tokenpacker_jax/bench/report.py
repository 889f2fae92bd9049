"""BENCHMARKS.md as the tables write it: Markdown tables, verdicts, and the generated sections
between their markers.

On the CPU a table's section is ``projector``, ``training``, ...; on an accelerator
``projector_gpu``, ... titled with the device's name (``section``), so both stay in
BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax

from tokenpacker_jax.bench.hardware import accelerator


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells for {len(headers)} headers")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "**met**" if met else "**not met**"


@dataclasses.dataclass(frozen=True)
class Section:
    """One generated part of BENCHMARKS.md: ``body`` goes between its markers."""

    name: str  # marker key: <!-- bench:NAME --> ... <!-- /bench:NAME -->
    title: str  # heading used when the section is added the first time
    body: str  # Markdown

    def markdown(self) -> str:
        return f"## {self.title}\n\n{self.body}\n"


def section(name: str, title: str, body: str) -> Section:
    """The ``Section`` of a table measured where JAX runs: ``name`` on the CPU; on an
    accelerator ``{name}_{backend}`` titled with the device's name (``projector_gpu``,
    "... on NVIDIA H100 80GB HBM3"), so BENCHMARKS.md keeps the CPU's figures beside it."""
    backend = accelerator()
    if backend is None:
        return Section(name, title, body)
    return Section(f"{name}_{backend}", f"{title} on {jax.devices()[0].device_kind}", body)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def update_section(path: str, section: Section) -> None:
    """Replaces the text between the section's markers in ``path`` (the prose around them is
    kept), or appends the section with its heading and markers if the file has none."""
    start, end = _markers(section.name)
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    block = f"{start}\n{section.body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + f"\n\n## {section.title}\n\n{block}\n"
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
