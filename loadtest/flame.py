"""Flame graphs from collapsed stacks (py-spy's ``raw`` format), and where the time went.

``a (f.py:1);b (g.py:7) 42`` per line: a stack, root first, and its sample count. The SVG
is static (hover titles only, no script) so it opens anywhere; the tables name the functions
that hold the CPU, which is what a reader of a load report wants first.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from typing import Any

_LINE = re.compile(r"^(.*) (\d+)$")
_LINENO = re.compile(r":\d+\)$")


def parse_collapsed(text: str) -> Counter[tuple[str, ...]]:
    """Stacks (root first) and their sample counts."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            stacks[tuple(m.group(1).split(";"))] += int(m.group(2))
    return stacks


def function_of(frame: str) -> str:
    """``f (file.py:12)`` -> ``f (file.py)``: samples on any line of a function add up."""
    return _LINENO.sub(")", frame)


# Leaves where a thread sits waiting rather than working (py-spy samples them as active):
# the event loop's poll, an idle executor thread, lock and event waits.
WAITING = (
    "EpollSelector.select (selectors.py)",
    "_worker (concurrent/futures/thread.py)",
    "Condition.wait (threading.py)",
    "Event.wait (threading.py)",
    "Thread.join (threading.py)",
)


def hot_functions(stacks: Counter[tuple[str, ...]], n: int = 25) -> dict[str, Any]:
    """Top functions by self and by inclusive samples, waiting samples left out.

    Shares are of the working samples; ``waiting_share`` is the part left out.
    """
    everything = sum(stacks.values()) or 1
    working = {s: c for s, c in stacks.items() if s and function_of(s[-1]) not in WAITING}
    total = sum(working.values()) or 1
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for stack, count in working.items():
        self_c[function_of(stack[-1])] += count
        for fn in {function_of(f) for f in stack}:
            incl[fn] += count

    def top(c: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": fn, "samples": k, "share": round(k / total, 4)}
            for fn, k in c.most_common(n)
        ]

    return {
        "samples": everything,
        "working_samples": sum(working.values()),
        "waiting_share": round(1 - sum(working.values()) / everything, 4),
        "self": top(self_c),
        "inclusive": top(incl),
    }


def render_svg(stacks: Counter[tuple[str, ...]], title: str, width: int = 1200) -> str:
    """A flame graph (root at the bottom) as a standalone SVG."""
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for stack, count in stacks.items():
        node = tree
        node["n"] += count
        for frame in stack:
            node = node["kids"].setdefault(frame, {"n": 0, "kids": {}})
            node["n"] += count
    total = tree["n"] or 1
    row_h = 16

    def depth(node: dict[str, Any]) -> int:
        return 1 + max((depth(k) for k in node["kids"].values()), default=0)

    levels = depth(tree)
    height = levels * row_h + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="11">',
        f'<text x="4" y="16" font-size="14">{html.escape(title)} ({total} samples)</text>',
    ]
    min_w = 0.5  # px: narrower frames are not drawn

    def draw(node: dict[str, Any], name: str, x: float, level: int) -> None:
        w = node["n"] / total * width
        if w < min_w:
            return
        y = height - (level + 1) * row_h
        if level >= 0:
            share = node["n"] / total * 100
            hue = 20 + (hash(function_of(name)) % 40)
            label = html.escape(name)
            out.append(
                f'<g><title>{label} ({node["n"]} samples, {share:.2f}%)</title>'
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 1}" '
                f'fill="hsl({hue},90%,60%)"/>'
            )
            chars = int(w / 7)
            if chars >= 4:
                text = name if len(name) <= chars else name[: chars - 2] + ".."
                out.append(f'<text x="{x + 2:.1f}" y="{y + 12}">{html.escape(text)}</text>')
            out.append("</g>")
        cx = x
        for kid_name, kid in sorted(node["kids"].items()):
            draw(kid, kid_name, cx, level + 1)
            cx += kid["n"] / total * width

    draw(tree, "all", 0.0, -1)
    out.append("</svg>")
    return "".join(out)
