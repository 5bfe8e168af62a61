"""Let the kernels that read a model's inputs take them at any element-aligned address (zero-copy inputs).

Why: TVM declares every kernel buffer 64-byte aligned, so LLVM reads inputs with aligned vector loads
(`vmovaps`), which fault on the 16-byte aligned memory numpy hands out. The runtime therefore copied every
input into a tensor of its own before each call: for a GPT-2 decode step that is the whole past KV cache,
4.7 MB read and written again (about 1 ms of a 10 ms step here), work onnxruntime does not do.

This pass lowers the declared alignment of exactly those kernel parameters that receive a model input (or a
reshaped view of one) to the input's element size; LLVM then emits unaligned loads (`vmovups`), which cost
the same on aligned data. Weights and intermediate tensors keep 64 bytes. When every use of every input is
such a kernel (or a view), the function gets the attribute `INPUTS_ANY_ALIGNMENT`; `build` records it in the
manifest and the runtime then hands numpy's buffers to the VM as they are (`runtime_bridge.host.InputTensors`).

TVM 0.27's TIR keeps a buffer's alignment in the type of the buffer variable, shared by every use of it in
the kernel; `PrimFunc.specialize` refuses to change an alignment and no buffer substitution is exposed to
Python, so the pass edits that one type field through TVM's own JSON form of the function (which keeps every
other node, and the sharing between them, as it was).
"""

from __future__ import annotations

import json

import tvm
from tvm import relax

# attribute of a Relax function whose inputs the kernels accept at any element-aligned address
INPUTS_ANY_ALIGNMENT = "edgecc.inputs_any_alignment"

_VIEW_OPS = ("relax.reshape", "relax.memory.view")  # same data pointer as their argument


def _element_bytes(dtype) -> int:
    dt = tvm.runtime.DataType(str(dtype))
    return max(1, (dt.bits * dt.lanes) // 8)


def input_kernel_params(func: relax.Function) -> tuple[dict[str, set[int]], bool]:
    """{kernel name: positions of its parameters that receive a model input}, and whether those kernels
    (and views) are the only uses of the inputs. Inputs are the first `num_input` parameters of `func`."""
    num_input = int(func.attrs["num_input"])
    inputs = set(func.params[:num_input])
    positions: dict[str, set[int]] = {}
    covered = True

    def _uses_input(expr) -> bool:
        return any(v in inputs for v in relax.analysis.free_vars(expr))

    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not _uses_input(value):
                continue
            if isinstance(binding, relax.MatchCast) or isinstance(value, (relax.Var, relax.Tuple, relax.TupleGetItem)):
                inputs.add(binding.var)  # an alias, or a tuple holding one: followed to where it is read
                continue
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                name = value.op.name
                if name in _VIEW_OPS and value.args[0] in inputs:
                    inputs.add(binding.var)
                    continue
                if name == "relax.call_tir" and isinstance(value.args[1], relax.Tuple):
                    args = list(value.args[1].fields)
                    hits = {i for i, a in enumerate(args) if a in inputs}
                    positions.setdefault(value.args[0].name_hint, set()).update(hits)
                    if any(_uses_input(a) for i, a in enumerate(args) if i not in hits) or (
                            len(value.args) > 2 and _uses_input(value.args[2])):  # nested, or a shape variable
                        covered = False
                    continue
            covered = False  # a vendor call, a builtin...: it may assume 64-byte alignment
    # the function's result may be an input itself (an identity model): the runtime copies such outputs
    return positions, covered


def relax_param_alignment(prim_func: tvm.tirx.PrimFunc, positions: set[int]) -> tvm.tirx.PrimFunc:
    """`prim_func` with the buffers of the parameters at `positions` declared element-aligned."""
    graph = json.loads(tvm.ir.save_json(prim_func))
    nodes = graph["nodes"]
    param_ids = nodes[nodes[graph["root_index"]]["data"]["params"]]["data"]
    changed = False
    for pos in sorted(positions):
        param = prim_func.params[pos]
        if not tvm.tirx.buffer.is_buffer_var(param):
            continue
        type_node = nodes[nodes[param_ids[pos]]["data"]["ty"]]
        if type_node.get("type") != "tirx.BufferType":
            raise RuntimeError(f"unexpected TIR parameter type {type_node.get('type')} in the JSON graph")
        type_node["data"]["data_alignment"] = _element_bytes(param.dtype)
        changed = True
    return tvm.ir.load_json(json.dumps(graph)) if changed else prim_func


@tvm.transform.module_pass(opt_level=0, name="edgecc.UnalignedInputs")
def unaligned_inputs_pass(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
    """Element-aligned input parameters for every kernel that reads an input (see the module docstring)."""
    positions: dict[str, set[int]] = {}
    marked = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or "num_input" not in (func.attrs or {}):
            continue
        found, covered = input_kernel_params(func)
        for name, pos in found.items():
            positions.setdefault(name, set()).update(pos)
        marked[gv] = func.with_attr(INPUTS_ANY_ALIGNMENT, covered)
    if not marked:
        return mod
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in marked.items():
        out[gv] = func
    for name, pos in positions.items():
        gv = out.get_global_var(name)
        kernel = out[gv]
        if isinstance(kernel, tvm.tirx.PrimFunc):
            out[gv] = relax_param_alignment(kernel, pos)
    return out


def inputs_any_alignment(mod: tvm.ir.IRModule, entry: str = "main") -> bool:
    """Whether `entry`'s kernels take its inputs at any element-aligned address (the pass marked it so)."""
    func = next((f for gv, f in mod.functions_items() if gv.name_hint == entry), None)
    if not isinstance(func, relax.Function):
        return False
    return bool((func.attrs or {}).get(INPUTS_ANY_ALIGNMENT, False))
