"""Keep the user's graph input/output names apart from every name the quantizer writes.

A graph's inputs and outputs are the user's contract (configs name them: ``model.output_names``,
``data.*`` feeds); everything else is internal. Two things broke that:

* Exporters name internal values after ops (torch's dynamo exporter calls an ``aten.embedding``
  result ``embedding``), and a user output named the same way was then *defined twice* - the
  FP32 reference itself failed to load with "Duplicate definition of name (embedding)".
  :func:`repair_duplicate_definitions` renames every earlier, internal definition of a name
  (and the readers that meant it) so each name is defined once.
* ONNX Runtime's quantizers derive new names by suffixing existing ones (``<x>_quantized``,
  ``<x>_scale``, ``<x>_zero_point``, ``augmented_model`` outputs...) without looking at the
  graph's outputs, so a user output named ``x_scale`` would collide. :func:`private_io` renames
  the graph inputs and outputs to reserved placeholders for the whole quantization, and
  :func:`restore_io` puts the user's names back at the end, first moving any internal tensor
  that took one of those names out of the way. Every name, not a list of known ones.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

from exporters.quant.graph import NameScope

PLACEHOLDER_PREFIX = "precision_search::io::"
"""Reserved prefix of the placeholders; '::' does not occur in names exporters write."""


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


def private_io(model: onnx.ModelProto) -> dict[str, str]:
    """Rename the graph's inputs (not initializers) and outputs to reserved placeholders.

    Returns ``{placeholder: user name}`` for :func:`restore_io`. A tensor that is both an input
    and an output keeps one placeholder. Readers, producers and value_info follow.
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    mapping: dict[str, str] = {}
    back: dict[str, str] = {}
    for i, v in enumerate(list(g.input) + list(g.output)):
        if v.name in inits or v.name in mapping:
            continue
        mapping[v.name] = f"{PLACEHOLDER_PREFIX}{i}"
    for old, new in mapping.items():
        _rename_everywhere(model, old, new)
        back[new] = old
    return back


def restore_io(model: onnx.ModelProto, back: dict[str, str]) -> None:
    """Give the placeholders of :func:`private_io` their user names back.

    Any internal tensor or node that took a user's name meanwhile (an ORT pass suffixing a
    neighbour's name) is renamed first, so the user's names are defined once.
    """
    names = NameScope(model)
    users = set(back.values())
    g = model.graph
    for t in g.initializer:
        if t.name in users:
            new = names.fresh(f"{t.name}__internal")
            _rename_readers(g, t.name, new)
            t.name = new
    for k, n in enumerate(g.node):
        for j, o in enumerate(n.output):
            if o in users:
                new = names.fresh(f"{o}__internal")
                n.output[j] = new
                _rename_readers(g, o, new, k + 1)
                for vi in g.value_info:
                    if vi.name == o:
                        vi.name = new
    for new, old in back.items():
        _rename_everywhere(model, new, old)


def _rename_everywhere(model: onnx.ModelProto, old: str, new: str) -> None:
    g = model.graph
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.name == old:
            v.name = new
    for n in g.node:
        for j, o in enumerate(n.output):
            if o == old:
                n.output[j] = new
    _rename_readers(g, old, new)
