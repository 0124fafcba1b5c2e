"""Showing lineage: where a record came from, as a text tree or a graphviz drawing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from lamin_io.errors import InvalidArgumentError, MissingDependencyError
from lamin_io.registry import _schema as s
from lamin_io.registry._run import Run

if TYPE_CHECKING:
    import os

    from lamin_io.registry._record import Versioned

__all__ = ["view_lineage"]

_IMAGE_FORMATS = ("svg", "png", "pdf", "dot")


def _record_label(record: Versioned) -> str:
    kind = type(record).__name__.lower()
    return f"{kind} {record.key or '(no key)'} (v{record.version}, uid {record.uid})"


def _run_label(run: Run) -> str:
    t = run.transform
    row = run._saved()  # noqa: SLF001
    return (f"run {row.uid} · {t.kind} {t.name} ({t.version}) · {row.user or '?'} · "
            f"{row.started_at:%Y-%m-%d %H:%M} · {run.status}")


class _Graph:
    """Nodes and edges met while walking upstream, for the drawing."""

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[str, str]] = {}  # id -> (label, shape)
        self.edges: set[tuple[str, str]] = set()

    def record(self, record: Versioned) -> str:
        node = f"{record._kind}_{record.uid}"  # noqa: SLF001
        self.nodes[node] = (f"{record.key or record.uid}\nv{record.version}", "box")
        return node

    def run(self, run: Run) -> str:
        node = f"run_{run.uid}"
        t = run.transform
        self.nodes[node] = (f"{t.name}\nrun {run.uid[:8]} · {run.status}", "ellipse")
        return node


def view_lineage(start: Versioned | Run, *, image: str | os.PathLike[str] | None = None,
                 depth: int | None = None) -> str:
    """Print and return ``start``'s upstream lineage as a text tree; optionally draw it.

    See :meth:`Artifact.view_lineage`.
    """
    if depth is not None and (not isinstance(depth, int) or depth < 0):
        msg = f"depth must be a whole number 0 or more, got {depth!r}"
        raise InvalidArgumentError(msg)
    graph = _Graph()
    shown: set[str] = set()
    lines: list[str] = []

    def walk_run(run: Run, prefix: str, level: int, output: str | None) -> None:
        node = graph.run(run)
        if output is not None:
            graph.edges.add((node, output))
        if run.uid in shown:
            lines[-1] += "  (shown above)"
            return
        shown.add(run.uid)
        inputs = list(run.inputs)
        if depth is not None and level > depth:
            if inputs:
                lines.append(f"{prefix}└── ... {len(inputs)} input(s)")
            return
        for i, record in enumerate(inputs):
            last = i == len(inputs) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{_record_label(record)}")
            walk_record(record, prefix + ("    " if last else "│   "), level, node)

    def walk_record(record: Versioned, prefix: str, level: int, consumer: str | None) -> None:
        node = graph.record(record)
        if consumer is not None:
            graph.edges.add((node, consumer))
        run = record.run
        if run is None:
            lines.append(f"{prefix}└── (saved outside a tracked run)")
            return
        lines.append(f"{prefix}└── {_run_label(run)}")
        walk_run(run, prefix + "    ", level + 1, node)

    if isinstance(start, Run):
        lines.append(_run_label(start))
        walk_run(start, "", 0, None)
        outputs = list(start.outputs)
        node = graph.run(start)
        for record in outputs:
            graph.edges.add((node, graph.record(record)))
        lines += ["outputs:"] if outputs else []
        lines += [f"    {_record_label(r)}" for r in outputs]
    else:
        lines.append(_record_label(start))
        walk_record(start, "", 0, None)
        readers = _readers(start)
        if readers:
            lines.append("read by:")
            lines += [f"    {_run_label(r)}" for r in readers]
    text = "\n".join(lines)
    if image is not None:
        _draw(graph, Path(image))
    print(text)
    return text


def _readers(record: Versioned) -> list[Run]:
    """Return the runs that recorded ``record`` as an input, oldest first."""
    registry = record._conn()  # noqa: SLF001
    ri = s.run_input
    column = ri.c[f"{record._kind}_id"]  # noqa: SLF001
    with registry.db.read() as c:
        rows = c.execute(select(s.run).join(ri, ri.c.run_id == s.run.c.id)
                         .where(column == record._saved().id)  # noqa: SLF001
                         .order_by(s.run.c.id)).all()
    return [Run._from_row(r, registry.registry) for r in rows]


def _draw(graph: _Graph, path: Path) -> None:
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in _IMAGE_FORMATS:
        msg = (f"cannot draw lineage into {path.name}: give a file ending in "
               f"{', '.join('.' + f for f in _IMAGE_FORMATS)}")
        raise InvalidArgumentError(msg)
    try:
        import graphviz
    except ImportError as exc:
        msg = "drawing lineage needs graphviz: pip install 'lamin-io[lineage]'"
        raise MissingDependencyError(msg) from exc
    dot = graphviz.Digraph("lineage", graph_attr={"rankdir": "LR"})
    for node, (label, shape) in graph.nodes.items():
        dot.node(node, label=label, shape=shape)
    for tail, head in sorted(graph.edges):
        dot.edge(tail, head)
    if fmt == "dot":
        path.write_text(dot.source)
        return
    try:
        data: Any = dot.pipe(format=fmt)
    except graphviz.ExecutableNotFound as exc:
        msg = ("drawing lineage needs graphviz's dot program (apt install graphviz, brew "
               "install graphviz); a .dot file needs only the Python package")
        raise MissingDependencyError(msg) from exc
    path.write_bytes(data)
