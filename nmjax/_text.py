"""Plain-text tables for the reports (``print(plan)``, ``summarize``, a conversion's report)."""

from __future__ import annotations

from collections.abc import Sequence


def table(head: Sequence[str], body: Sequence[Sequence[str]], right: set[int] = frozenset()
          ) -> list[str]:
    """Aligned lines: the header, a rule, one line per row (columns in ``right``
    right-aligned).

    >>> print("\\n".join(table(("path", "density"), [("Dense_0/kernel", "0.500")], {1})))
    path            density
    --------------  -------
    Dense_0/kernel    0.500
    """
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'>' if i in right else '<'}{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths)),
            *(fmt.format(*row) for row in body)]


__all__ = ["table"]
