"""Collectives in a compiled XLA program's HLO text: what a sharded step sends."""

from __future__ import annotations

import math
import re

_COLLECTIVE = re.compile(r"=\s*(\([^=]*?\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")
_INDEX_COMMENT = re.compile(r"/\*index=\d+\*/")
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def _bytes(dtype: str, dims: str) -> int:
    size = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype)) // 8
    return size * math.prod(int(d) for d in dims.split(",") if d)


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """``{kind: (count, bytes)}`` of the collectives in ``compiled.as_text()``; bytes are
    the results' sizes per device (an all-gather's gathered array, an all-reduce's operand),
    counted once per op in the program text (an op inside a loop counts once).

    >>> collectives("%a = f32[4,8]{1,0} all-gather(%x), dimensions={0}")
    {'all-gather': (1, 128)}
    >>> collectives("%b = (f32[2], f32[2], f32[2], f32[2], f32[2], /*index=5*/f32[2]) "
    ...             "all-reduce(%p, %q, %r, %s, %t, %u), to_apply=%add")
    {'all-reduce': (1, 48)}
    """
    out: dict[str, tuple[int, int]] = {}
    for line in hlo_text.splitlines():
        # a tuple result of more than 5 arrays carries /*index=5*/ comments
        found = _COLLECTIVE.search(_INDEX_COMMENT.sub("", line))
        if found is None:
            continue
        size = sum(_bytes(d, s) for d, s in _SHAPE.findall(found.group(1)))
        count, total = out.get(found.group(2), (0, 0))
        out[found.group(2)] = (count + 1, total + size)
    return out
