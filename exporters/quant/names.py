"""Keep the user's graph input/output names apart from every name the quantizer writes.

A graph's inputs and outputs are the user's contract (configs name them: ``model.output_names``,
``data.*`` feeds); everything else is internal. Two things broke that:

* Exporters name internal values after ops (torch's dynamo exporter calls an ``aten.embedding``
  result ``embedding``), and a user output named the same way was then *defined twice* - the
  FP32 reference itself failed to load with "Duplicate definition of name (embedding)".
  :func:`repair_duplicate_definitions` renames every earlier, internal definition of a name
  (and the readers that meant it) so each name is defined once.
* ONNX Runtime's quantizers derive new names by suffixing existing ones (``<x>_quantized``,
  ``<x>_scale``, ``<x>_zero_point``... dozens of suffixes) without checking what exists, so an
  output, input or initializer named ``x_scale`` collided. :func:`private_names` renames every
  tensor to a reserved placeholder for the whole quantization (suffixed placeholders cannot
  equal placeholders), and :func:`restore_names` puts every name back at the end - the user's
  inputs and outputs exactly, derived names readable, any clash made unique. Every name, not a
  list of known ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from exporters.quant.graph import NameScope

PLACEHOLDER_PREFIX = "precision_search::t"
"""Reserved prefix of the placeholders ("::" does not occur in names exporters write)."""


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies) below it."""
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


def _rename_readers(graph: onnx.GraphProto, old: str, new: str, start: int = 0, stop: int | None = None) -> None:
    """Readers of ``old`` among nodes ``start:stop`` of ``graph`` (and their subgraphs) read ``new``."""
    for n in list(graph.node)[start:stop]:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                for g in _graphs(sub):
                    for m in g.node:
                        for i, name in enumerate(m.input):
                            if name == old:
                                m.input[i] = new


def repair_duplicate_definitions(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Make every tensor name of the main graph defined once; returns ``{name: [new names]}``.

    A name defined by a graph input or initializer and again by a node, or by two nodes, is
    kept for its *last* definition (for a graph output that is the value the graph returns);
    each earlier node-output definition gets a fresh name, and the nodes after it read the new
    name up to the next definition - exactly what they read before, in the topological order
    ONNX requires. Numerically neutral.
    """
    g = model.graph
    names = NameScope(model)
    fixed: dict[str, list[str]] = {}
    defined_outside = {i.name for i in g.input} | {t.name for t in g.initializer}
    producers: dict[str, list[int]] = {}
    for k, n in enumerate(g.node):
        for o in n.output:
            if o:
                producers.setdefault(o, []).append(k)
    for name, where in producers.items():
        if len(where) < 2 and name not in defined_outside:
            continue
        # Graph inputs/initializers win over a node only if no node redefines the name: a node
        # defining a name that is also an input is the exporter's collision, keep the graph-level one.
        renamed = where if name in defined_outside else where[:-1]
        for idx, k in enumerate(renamed):
            new = names.fresh(f"{name}__dup")
            n = g.node[k]
            n.output[list(n.output).index(name)] = new
            nxt = where[where.index(k) + 1] if where.index(k) + 1 < len(where) else None
            # Readers up to and including the next definer (which may read the value it replaces).
            _rename_readers(g, name, new, k + 1, None if nxt is None else nxt + 1)
            fixed.setdefault(name, []).append(new)
    return fixed


def _bulk_rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Apply ``mapping`` to every tensor name of ``graph`` and its subgraphs, in one pass."""
    for g in _graphs(graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            v.name = mapping.get(v.name, v.name)
        for t in g.initializer:
            t.name = mapping.get(t.name, t.name)
        for n in g.node:
            for j, x in enumerate(n.input):
                if x in mapping:
                    n.input[j] = mapping[x]
            for j, x in enumerate(n.output):
                if x in mapping:
                    n.output[j] = mapping[x]


def _tensor_names(graph: onnx.GraphProto) -> list[str]:
    seen: dict[str, None] = {}
    for g in _graphs(graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            seen.setdefault(v.name)
        for t in g.initializer:
            seen.setdefault(t.name)
        for n in g.node:
            for x in list(n.input) + list(n.output):
                if x:
                    seen.setdefault(x)
    return list(seen)


def _placeholder(k: int | str) -> str:
    """``<prefix><k>::``: ends in '::', so a suffixed placeholder (``..._scale``, ``...0``) never
    equals another placeholder."""
    return f"{PLACEHOLDER_PREFIX}{k}::"


def private_names(model: onnx.ModelProto) -> dict[str, str]:
    """Rename every tensor to ``<PLACEHOLDER_PREFIX><k>::`` for the passes; returns ``{placeholder: name}``.

    ORT's quantizers name what they add by suffixing an existing name (``_quantized``,
    ``_scale``, ``_zero_point``, ``_QuantizeLinear_Output`` and dozens more); with every tensor
    named ``<prefix><k>``, no suffixed name can equal an existing one, whatever the user or the
    exporter called things. Node names are kept (the layer table addresses nodes by name).
    """
    names = _tensor_names(model.graph)
    back = {_placeholder(k): name for k, name in enumerate(names)}
    _bulk_rename(model.graph, {name: p for p, name in back.items()})
    return back


def restore_names(model: onnx.ModelProto, back: dict[str, str]) -> None:
    """Undo :func:`private_names`: every original tensor gets its name back, and a name a pass
    derived from a placeholder (``<prefix>12_scale``) becomes the original's (``relu_scale``) -
    or, when that is taken by an original name, a fresh variant of it. The graph's inputs and
    outputs keep exactly the user's names."""
    import re

    pattern = re.compile(re.escape(PLACEHOLDER_PREFIX) + r"(\d+)::(.*)", re.S)
    current = _tensor_names(model.graph)
    used = set(back.values())
    mapping: dict[str, str] = {}
    for name in current:
        if name in back:
            mapping[name] = back[name]
    for name in current:
        if name in back:
            continue
        m = pattern.fullmatch(name)
        base = back[_placeholder(m.group(1))] + m.group(2) if m and _placeholder(m.group(1)) in back else name
        new, i = base, 1
        while new in used:
            new = f"{base}__{i}"
            i += 1
        used.add(new)
        if new != name:
            mapping[name] = new
    _bulk_rename(model.graph, mapping)
