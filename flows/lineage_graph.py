"""The lineage graph as a picture: the open-source UI renders Markdown images, not Mermaid source.

Layered left to right by depth (the longest chain of inputs behind an artifact), one column per depth, so
the input files stand on the left and the evaluation on the right; each box is an artifact with its first
hash digits, each arrow one "made from". Drawn with matplotlib (the plots' library), from the same nodes and
edges the lineage list is made of.
"""

from __future__ import annotations

import io
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

COLUMN_W, ROW_H = 3.1, 0.42  # inches per depth column, per box row


def depths(nodes: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Longest path from a source to each node (the DAG of one run: no cycles)."""
    parents = defaultdict(list)
    for src, dst in edges:
        parents[dst].append(src)
    memo: dict[str, int] = {}

    def depth(node: str) -> int:
        if node not in memo:
            memo[node] = 1 + max((depth(p) for p in parents[node]), default=-1)
        return memo[node]

    return {n: depth(n) for n in nodes}


def order_by_parents(columns: dict[int, list[str]], edges: list[tuple[str, str]]) -> None:
    """Sort each column by the mean position of its inputs in the columns before it (the barycentre
    heuristic), so arrows cross less; a node without inputs keeps its place."""
    parents = defaultdict(list)
    for src, dst in edges:
        parents[dst].append(src)
    rank: dict[str, float] = {}
    for col in sorted(columns):
        nodes = columns[col]
        for i, node in enumerate(nodes):
            placed = [rank[p] for p in parents[node] if p in rank]
            rank[node] = sum(placed) / len(placed) if placed else i / max(len(nodes), 1)
        nodes.sort(key=lambda n: rank[n])
        for i, node in enumerate(nodes):
            rank[node] = i / max(len(nodes), 1)


def draw_lineage(labels: dict[str, str], edges: list[tuple[str, str]]) -> bytes:
    """PNG bytes of the graph: `labels` node -> its text (kept in order within a column), `edges` (from,
    to)."""
    level = depths(list(labels), edges)
    columns: dict[int, list[str]] = defaultdict(list)
    for node in labels:
        columns[level[node]].append(node)
    order_by_parents(columns, edges)
    rows = max(len(c) for c in columns.values())
    fig, ax = plt.subplots(figsize=(COLUMN_W * len(columns) + 0.5, ROW_H * rows + 0.8), dpi=90)
    where = {  # each column centred vertically
        node: (col * COLUMN_W, ((len(nodes) - 1) / 2 - i) * ROW_H)
        for col, nodes in columns.items()
        for i, node in enumerate(nodes)
    }
    for src, dst in edges:
        (x0, y0), (x1, y1) = where[src], where[dst]
        ax.annotate(
            "",
            xy=(x1 - COLUMN_W * 0.46, y1),
            xytext=(x0 + COLUMN_W * 0.46, y0),
            arrowprops={"arrowstyle": "->", "color": "#8a8f98", "lw": 0.6, "shrinkA": 0, "shrinkB": 0},
        )
    for node, text in labels.items():
        x, y = where[node]
        colour = "#eef2f7" if level[node] else "#fff6e0"  # input files (depth 0) stand out
        box = {"boxstyle": "round,pad=0.25", "fc": colour, "ec": "#5b6472", "lw": 0.6}
        ax.text(x, y, text, ha="center", va="center", fontsize=6.5, family="monospace", bbox=box)
    ax.set_xlim(-COLUMN_W / 2, COLUMN_W * (len(columns) - 0.5))
    ax.set_ylim(-rows / 2 * ROW_H - ROW_H / 2, rows / 2 * ROW_H + ROW_H / 2)
    ax.axis("off")
    out = io.BytesIO()
    fig.savefig(out, format="png", bbox_inches="tight")
    plt.close(fig)
    return out.getvalue()
