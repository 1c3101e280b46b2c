"""PyTorch adapter: model -> FP32 ONNX reference + layer table.

Export uses the dynamo exporter (``torch.onnx.export(dynamo=True)``), which
keeps each node's module path in its metadata (``pkg.torch.onnx.name_scopes``),
with a dynamic batch axis. Mapping layers to ONNX is done by **weight content**
(each module's weight, or its transpose, equals exactly one initializer), with
the module path as a tie-breaker. Names alone are not enough: constant folding
renames transposed weights, and ``nn.MultiheadAttention`` calls ``F.linear`` on
raw parameters, so its projections carry no module scope of their own.

ONNX optimizers deduplicate identical initializers (deep-copied layers start
with equal weights), which would make one weight feed several nodes; the adapter
un-ties those so every quantizable node owns its weight and can get its own
format. Genuinely tied weights (one ``Parameter`` used twice) become separate
layers ``name`` and ``name#2``, each with its own copy in the ONNX file.

Folding: the exporter's optimizer folds a BatchNorm that follows a conv (or linear) into
it, so the ONNX weight is ``W * gamma / sqrt(var + eps)`` - new bytes, and the node's
name scope is the BatchNorm's. Layers left unmatched by content are then tied to the
remaining nodes by structure: same shape, the weight a per-output-channel rescaling of
the module's (:func:`pipeline.layers.scaled_axis`), and the initializer named after the
parameter (the optimizer keeps ``conv1.weight``) or the node scoped in the module. The
row records the folded module (``folded``), and that BatchNorm is reported as folded.

In-memory models: ``TorchAdapter(config, model=module, sample_inputs=...)`` exports a
module that lives in a notebook (a deep copy, so the caller's module is never put in
eval mode or changed); the sample (arrays, or input specs ``name -> (shape, dtype)``)
replaces the calibration batch that sets the exported input signature.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.config import ConfigError, SearchConfig
from pipeline.data import SINGLE_INPUT_NAME, load_dataset
from pipeline.layers import (
    SKIPPED_REASON,
    Layer,
    LayerTable,
    UnquantizedModule,
    choose_candidate,
    folded_reason,
    scaled_axis,
    unquantized_reason,
)
from pipeline.models.base import ModelAdapter, ReferenceModel

log = logging.getLogger(__name__)

QUANT_OPS = {"Gemm": (1,), "MatMul": (1, 0), "Conv": (1,), "Gather": (0,)}
EXPORT_FORM = "folded-layers-v1"
"""Version of the layer-table rules (part of the content hash: a reference cached by an older
adapter, e.g. one that lost BatchNorm-folded convs, is re-exported rather than reused)."""


@dataclass
class _TorchLayer:
    name: str
    module_path: str
    kind: str
    module_type: str
    weight: np.ndarray  # float32, as in torch
    param_id: int  # id() of the Parameter, to recognise genuine tying
    param_name: str = ""  # its state-dict name ("conv1.weight"): what the exporter names the initializer


def _quant_module_types():
    import torch.nn as nn

    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def _fingerprint(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest()


def enumerate_layers(model) -> list[_TorchLayer]:
    """Quantizable weights of a torch model, in module order.

    Linear, Conv1d/2d (grouped and depthwise included: the ONNX Conv carries ``group``),
    Embedding, and MultiheadAttention's packed input projection. ConvTranspose has no
    quantized form in the exporter and stays fp32 (listed by :func:`enumerate_unquantized`).
    """
    import torch.nn as nn

    names = {id(p): n for n, p in model.named_parameters()}
    out: list[_TorchLayer] = []
    for path, mod in model.named_modules():
        w = None
        kind = None
        if isinstance(mod, nn.Linear):
            w, kind = mod.weight, "linear"
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            w, kind = mod.weight, "conv"
        elif isinstance(mod, nn.Embedding):
            w, kind = mod.weight, "embedding"
        elif isinstance(mod, nn.MultiheadAttention) and getattr(mod, "in_proj_weight", None) is not None:
            out.append(_TorchLayer(f"{path}.in_proj" if path else "in_proj", path, "matmul",
                                   "MultiheadAttention.in_proj", mod.in_proj_weight.detach().float().cpu().numpy(),
                                   id(mod.in_proj_weight), names.get(id(mod.in_proj_weight), "")))
            continue
        if w is not None:
            out.append(_TorchLayer(path or type(mod).__name__, path, kind, type(mod).__name__,
                                   w.detach().float().cpu().numpy(), id(w), names.get(id(w), "")))
    return out


def enumerate_unquantized(model, table: LayerTable | None = None) -> list[UnquantizedModule]:
    """Modules whose own parameters no quantizable layer covers (each stays fp32), in module order.

    With the layer ``table``: quantizable modules it could not map (``table.skipped``) are listed
    too, with all their parameters, so the params share counts them as fp32; a norm the exporter
    folded into a layer says so.
    """
    import torch.nn as nn

    skipped = set(table.skipped) if table else set()
    folded = {l.folded: l.name for l in table.layers if l.folded} if table else {}
    covered: set[int] = set()
    for path, mod in model.named_modules():
        if isinstance(mod, _quant_module_types()) and (path or type(mod).__name__) not in skipped:
            covered.update(id(p) for p in mod.parameters(recurse=False))
        elif isinstance(mod, nn.MultiheadAttention) and getattr(mod, "in_proj_weight", None) is not None:
            if (f"{path}.in_proj" if path else "in_proj") not in skipped:
                covered.update(id(p) for p in (mod.in_proj_weight, mod.in_proj_bias) if p is not None)
    out: list[UnquantizedModule] = []
    seen: set[int] = set()
    for path, mod in model.named_modules():
        own = [p for p in mod.parameters(recurse=False) if id(p) not in covered and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            kind = type(mod).__name__
            name = path or kind
            reason = (SKIPPED_REASON if name in skipped or f"{name}.in_proj" in skipped
                      else folded_reason(folded[name]) if name in folded else unquantized_reason(kind))
            out.append(UnquantizedModule(name=name, module_type=kind, params=int(sum(p.numel() for p in own)),
                                         reason=reason))
    return out


def _scopes(node: onnx.NodeProto) -> list[str]:
    """The module paths the exporter recorded for a node, outermost first, then the op's own name.

    torch writes the list as a Python literal (``['', 'bn1', 'op']``, single quotes), so JSON
    cannot read it."""
    import ast

    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                value = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                try:
                    value = json.loads(p.value)
                except ValueError:
                    return []
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else []
    return []


def _all_node_inputs(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _all_node_inputs(g)
    return names


def _fold_weight_transposes(graph: onnx.GraphProto) -> int:
    """Replace ``Transpose(initializer)`` nodes by a transposed initializer.

    The exporter's constant folding keeps a weight's Transpose when the weight feeds several
    MatMuls (a module called twice, e.g. a siamese encoder), so those MatMuls see a computed
    tensor instead of an initializer and the layer could not be mapped. Exact (a copy, reordered)."""
    inits = {i.name: i for i in graph.initializer}
    kept, sources = [], set()
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            w = numpy_helper.to_array(inits[node.input[0]])
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)), node.output[0]))
            sources.add(node.input[0])
        else:
            kept.append(node)
    if sources:
        del graph.node[:]
        graph.node.extend(kept)
        used = _all_node_inputs(graph) | {o.name for o in graph.output}
        live = [i for i in graph.initializer if i.name in used or i.name not in sources]
        del graph.initializer[:]
        graph.initializer.extend(live)
    return len(sources)


def _node_key(node: onnx.NodeProto) -> str:
    """Stable identity of a node (protobuf wrappers are not: ``id()`` changes between iterations)."""
    return f"{node.name}|{node.output[0] if node.output else ''}"


def _match_rewritten(graph: onnx.GraphProto, inits: dict, torch_layers: list[_TorchLayer], taken: dict[int, int],
                     assigned: set[int]) -> list[tuple[int, onnx.NodeProto, int, str | None]]:
    """Tie layers whose weight the exporter rewrote (a BatchNorm folded into a conv) to the nodes
    left over, by structure rather than bytes: see the module docstring. Returns
    ``(layer idx, node, weight input, folded module)``; marks the chosen layers in ``taken``."""
    free = [i for i in range(len(torch_layers)) if i not in taken]
    found = []
    for node in graph.node:
        if not free:
            break
        if node.op_type not in QUANT_OPS or _node_key(node) in assigned:
            continue
        for pos in QUANT_OPS[node.op_type]:
            if pos >= len(node.input) or node.input[pos] not in inits:
                continue
            name = node.input[pos]
            w = numpy_helper.to_array(inits[name])
            if w.dtype.kind != "f":
                continue
            scopes = _scopes(node)
            scaled, named = [], []
            for i in free:
                tl = torch_layers[i]
                forms = [f for f in ([tl.weight] + ([tl.weight.T] if tl.weight.ndim == 2 else [])) if f.shape == w.shape]
                if not forms:
                    continue
                if any(scaled_axis(w, f) is not None for f in forms):
                    scaled.append(i)
                if name == tl.param_name or (tl.module_path and tl.module_path in scopes):
                    named.append(i)
            both = [i for i in scaled if i in named]
            pick = both or (scaled if len(scaled) == 1 else named if len(named) == 1 else [])
            if not pick:
                continue
            chosen = pick[0]
            free.remove(chosen)
            taken[chosen] = taken.get(chosen, 0) + 1
            module_scopes = [sc for sc in scopes[:-1] if sc]  # the last scope is the op itself
            note = module_scopes[-1] if module_scopes and module_scopes[-1] != torch_layers[chosen].module_path else None
            log.debug("layer %s: weight rewritten by the exporter (%s folded in); mapped to %s by structure",
                      torch_layers[chosen].name, note, node.name)
            found.append((chosen, node, pos, note))
            break
    return found


def build_layer_table(onnx_model: onnx.ModelProto, torch_layers: list[_TorchLayer]) -> LayerTable:
    """Map each torch layer to exactly one ONNX node + initializer; un-tie shared initializers in place."""
    graph = onnx_model.graph
    _fold_weight_transposes(graph)
    inits = {i.name: i for i in graph.initializer}

    by_print: dict[str, list[int]] = {}
    for idx, tl in enumerate(torch_layers):
        prints = {_fingerprint(tl.weight)}
        if tl.weight.ndim == 2:
            prints.add(_fingerprint(tl.weight.T))
        for fp in prints:
            by_print.setdefault(fp, []).append(idx)

    init_prints: dict[str, str] = {}
    assignments: list[tuple[int, onnx.NodeProto, int]] = []  # (torch layer idx, node, weight input index)
    taken: dict[int, int] = {}
    for node in graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        for pos in QUANT_OPS[node.op_type]:
            if pos >= len(node.input) or node.input[pos] not in inits:
                continue
            name = node.input[pos]
            if name not in init_prints:
                init_prints[name] = _fingerprint(numpy_helper.to_array(inits[name]).astype(np.float32))
            cands = by_print.get(init_prints[name], [])
            if not cands:
                continue
            scopes = set(_scopes(node))
            chosen = choose_candidate(cands, lambda c: torch_layers[c].module_path in scopes, taken)
            assignments.append((chosen, node, pos))
            break
    folded: dict[str, str] = {}  # node key -> module folded into it
    if len(taken) < len(torch_layers):
        order = {_node_key(n): k for k, n in enumerate(graph.node)}
        for chosen, node, pos, note in _match_rewritten(graph, inits, torch_layers, taken,
                                                        {_node_key(n) for _, n, _ in assignments}):
            assignments.append((chosen, node, pos))
            if note:
                folded[_node_key(node)] = note
        assignments.sort(key=lambda a: order[_node_key(a[1])])

    # Un-tie: each quantizable node gets its own initializer.
    consumers: dict[str, int] = {}
    for _, node, pos in assignments:
        consumers[node.input[pos]] = consumers.get(node.input[pos], 0) + 1
    seen: dict[str, int] = {}
    for _, node, pos in assignments:
        w = node.input[pos]
        if consumers[w] > 1:
            seen[w] = seen.get(w, 0) + 1
            if seen[w] > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[w])
                copy.name = f"{w}__untied{seen[w]}"
                graph.initializer.append(copy)
                node.input[pos] = copy.name

    layers: list[Layer] = []
    uses: dict[int, int] = {}
    for idx, node, pos in assignments:
        tl = torch_layers[idx]
        uses[idx] = uses.get(idx, 0) + 1
        name = tl.name if uses[idx] == 1 else f"{tl.name}#{uses[idx]}"
        init = next(i for i in graph.initializer if i.name == node.input[pos])
        shape = tuple(int(d) for d in init.dims)
        macs = int(np.prod(tl.weight.shape)) if tl.kind in ("linear", "matmul") else None
        layers.append(Layer(name=name, kind=tl.kind, module_type=tl.module_type, onnx_node=node.name,
                            onnx_op=node.op_type, weight=node.input[pos], weight_shape=shape,
                            params=int(np.prod(shape)), macs=macs, folded=folded.get(_node_key(node))))

    unmatched = [i for i in range(len(torch_layers)) if i not in uses]
    all_prints = {_fingerprint(numpy_helper.to_array(i).astype(np.float32)) for i in graph.initializer
                  if i.data_type == onnx.TensorProto.FLOAT}
    skipped, stranded = [], []
    for i in unmatched:
        tl = torch_layers[i]
        prints = {_fingerprint(tl.weight)} | ({_fingerprint(tl.weight.T)} if tl.weight.ndim == 2 else set())
        (stranded if prints & all_prints else skipped).append(tl.name)
    if stranded:
        raise RuntimeError(
            f"layer table: {len(stranded)} layer(s) have their weight in the ONNX graph but feed no "
            f"Gemm/MatMul/Conv/Gather node directly: {stranded[:10]}; please report this model"
        )
    for name in skipped:
        # Unused in forward(), or computed away by the exporter (e.g. a position-embedding Gather with
        # constant indices is folded into a constant): there is no weight left to quantize.
        log.warning("layer %s: its weight is not in the exported graph (unused or constant-folded); not quantizable", name)
    node_names = [l.onnx_node for l in layers]
    if len(set(node_names)) != len(node_names):
        raise RuntimeError("layer table: one ONNX node claimed by several layers; please report this model")
    return LayerTable(layers=layers, skipped=skipped)


def normalise_sample(sample: Any, field: str) -> dict[str, np.ndarray]:
    """A sample batch from arrays/tensors (one, or a dict by input name) or from input specs
    ``name -> (shape, dtype)`` (``None`` or ``-1`` for the batch axis). Specs give a batch of 2
    (a batch of 1 would be specialised by torch.export): normal noise for floats, zeros for ints."""
    def as_array(v: Any, name: str) -> np.ndarray:
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], (tuple, list)):
            shape = tuple(2 if d in (None, -1) else int(d) for d in v[0])
            dtype = np.dtype(str(v[1]).replace("torch.", ""))
            return (np.random.default_rng(0).standard_normal(shape).astype(dtype) if dtype.kind == "f"
                    else np.zeros(shape, dtype))
        if hasattr(v, "detach"):
            v = v.detach().cpu().numpy()
        a = np.asarray(v)
        if a.ndim == 0:
            raise ConfigError(f"{field}[{name!r}]: a sample needs a batch axis, got a scalar")
        return a.astype(np.float32) if a.dtype == np.float64 else a

    items = sample.items() if isinstance(sample, dict) else [(SINGLE_INPUT_NAME, sample)]
    out = {str(k): as_array(v, str(k)) for k, v in items}
    if not out:
        raise ConfigError(f"{field}: empty; give one array, or a dict input name -> array or (shape, dtype)")
    return {k: (v if len(v) >= 2 else np.concatenate([v, v])) for k, v in out.items()}


def _content_hash(model, config: SearchConfig, sample: dict[str, np.ndarray]) -> str:
    import torch

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(config.model.model_dump_json().encode())
    h.update(json.dumps({k: [list(v.shape[1:]), str(v.dtype)] for k, v in sample.items()}).encode())
    h.update(torch.__version__.encode())
    h.update(EXPORT_FORM.encode())
    return h.hexdigest()[:16]


class TorchAdapter(ModelAdapter):
    framework = "torch"

    def __init__(self, config: SearchConfig, model: Any = None, sample_inputs: Any = None):
        super().__init__(config)
        if model is not None:
            import torch

            if not isinstance(model, torch.nn.Module):
                raise ConfigError(f"model: expected a torch.nn.Module (model.framework is torch), "
                                  f"got {type(model).__name__}")
        self._model = model
        self._sample: dict[str, np.ndarray] | None = (
            None if sample_inputs is None else normalise_sample(sample_inputs, "sample_inputs"))

    # -- model -------------------------------------------------------------
    def load_model(self) -> Any:
        import torch

        if self._model is not None:  # in memory: a copy, so export/QAT never touch the caller's module
            return copy.deepcopy(self._model).eval()
        spec = self.config.model
        if spec.factory:
            from pipeline.importing import import_object

            model = import_object(spec.factory)(**spec.kwargs)
        else:
            path = self.config.resolve_path(spec.path)
            if path.suffix != ".pt2":
                raise ConfigError(
                    f"model.path: {path} — for PyTorch give `factory:` plus `checkpoint:` (a state dict), "
                    "or a .pt2 file saved with torch.export.save"
                )
            model = torch.export.load(str(path)).module()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model.factory: {spec.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
        if spec.checkpoint:
            ckpt = self.config.resolve_path(spec.checkpoint)
            if not ckpt.exists():
                raise ConfigError(f"model.checkpoint: {ckpt} does not exist")
            try:
                state = torch.load(ckpt, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ConfigError(
                    f"model.checkpoint: {ckpt} could not be loaded with weights_only=True ({exc}); "
                    "save a state_dict (torch.save(model.state_dict(), path)), not a pickled module"
                ) from exc
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            model.load_state_dict(state)
        return model.eval()

    def sample_inputs(self) -> dict[str, np.ndarray]:
        if self._sample is None:
            ds = load_dataset(self.config.data.calibration, self.config, "data.calibration")
            self._sample = ds.fixed_batch(2)  # batch 2: a batch of 1 would be specialised by torch.export
        return self._sample

    # -- export ------------------------------------------------------------
    def export_reference(self, workdir: Path) -> ReferenceModel:
        model = self.load_model()
        sample = self.sample_inputs()
        digest = _content_hash(model, self.config, sample)
        folder = Path(workdir) / "reference" / digest
        meta_path = folder / "reference.json"
        if meta_path.exists():
            return ReferenceModel.model_validate_json(meta_path.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        ref = self._export(model, sample, folder / "reference.onnx", digest)
        tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(ref.model_dump_json(indent=2))
        os.replace(tmp, meta_path)
        return ref

    def export_model(self, model: Any, out_path: Path) -> ReferenceModel:
        return self._export(model.eval(), self.sample_inputs(), Path(out_path), digest="")

    def _export(self, model, sample: dict[str, np.ndarray], out_path: Path, digest: str) -> ReferenceModel:
        import torch

        names = list(sample)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sample.items()}
        with torch.no_grad():
            out = model(tensors[SINGLE_INPUT_NAME]) if names == [SINGLE_INPUT_NAME] else model(**tensors)
        from torch.utils._pytree import tree_leaves

        n_out = sum(isinstance(t, torch.Tensor) for t in tree_leaves(out))  # HF ModelOutput is a dict
        if isinstance(out, dict) and len(out) == n_out:
            default = [str(k) for k in out]
        else:
            default = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        output_names = self.config.model.output_names or default
        if len(output_names) != n_out:
            raise ConfigError(f"model.output_names: {len(output_names)} names for {n_out} model outputs")

        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        if names == [SINGLE_INPUT_NAME]:
            args, kwargs, dyn = (tensors[SINGLE_INPUT_NAME],), {}, ({0: batch},)
        else:
            args, kwargs, dyn = (), tensors, {k: {0: batch} for k in names}
        tmp = out_path.with_suffix(f".tmp{os.getpid()}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            logging.getLogger("onnxscript").setLevel(logging.ERROR)  # harmless constant-folding warnings
            try:
                program = torch.onnx.export(
                    model, args, kwargs=kwargs, dynamo=True, opset_version=self.config.model.opset,
                    input_names=names, output_names=output_names, dynamic_shapes=dyn, optimize=True,
                    verbose=False, report=False,
                )
                onnx_model = program.model_proto
            except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript exporter
                log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", exc)
                torch.onnx.export(
                    model, args + tuple(kwargs.values()), str(tmp), dynamo=False,
                    opset_version=self.config.model.opset, input_names=names, output_names=output_names,
                    dynamic_axes={**{k: {0: "batch"} for k in names}, **{o: {0: "batch"} for o in output_names}},
                )
                onnx_model = onnx.load(str(tmp))
                tmp.unlink(missing_ok=True)
        table = build_layer_table(onnx_model, enumerate_layers(model))
        table.unquantized = enumerate_unquantized(model, table)
        onnx.save(onnx_model, str(tmp))
        os.replace(tmp, out_path)
        return ReferenceModel(onnx_path=str(out_path), layer_table=table, input_names=names,
                              output_names=output_names, content_hash=digest, framework="torch")
