"""Read the memory a compiled function needs off its lowered Relax IR.

After `StaticPlanBlockMemory` every intermediate and output tensor lives in a storage block allocated by
`R.vm.alloc_storage` with a size known at build time (for static shapes). Their sum is the activation arena a
call needs; the manifest reports it per entry point so a firmware engineer can size RAM before running.

What a run allocates besides: the TVM runtime hands out every storage block 64-byte aligned
(`kAllocAlignment`, whatever allocator), so a caller-provided arena needs `aligned_bytes` (each block rounded
up to 64) plus the largest kernel workspace (`firmware.workspace_bytes`). The outputs of the function are
storage blocks too (`LowerAllocTensor` turns their `alloc_tensor` into `alloc_storage`), so they are in
these figures; the inputs and weights are not (the caller owns them).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax


@dataclass(frozen=True)
class FunctionMemory:
    arena_bytes: int  # bytes of all statically sized storage blocks
    storage_blocks: int
    dynamic_blocks: int  # blocks whose size depends on runtime shapes (not in arena_bytes)
    aligned_bytes: int = 0  # arena_bytes with every block rounded up to ALIGNMENT, as the runtime allocates


ALIGNMENT = 64  # tvm::runtime::kAllocAlignment


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    return (nbytes + alignment - 1) // alignment * alignment


def function_memory(func: relax.Function) -> FunctionMemory:
    alloc_storage = tvm.ir.Op.get("relax.vm.alloc_storage")
    sizes: list[int] = []
    dynamic = 0

    def visit(expr):
        nonlocal dynamic
        if isinstance(expr, relax.Call) and expr.op.same_as(alloc_storage):
            shape = expr.args[0]
            if isinstance(shape, relax.ShapeExpr) and all(isinstance(v, tvm.tirx.IntImm) for v in shape.values):
                total = 1
                for v in shape.values:
                    total *= int(v)
                sizes.append(total)
            else:
                dynamic += 1

    relax.analysis.post_order_visit(func, visit)
    return FunctionMemory(sum(sizes), len(sizes), dynamic, sum(align_up(n) for n in sizes))


def module_memory(lowered: tvm.IRModule) -> dict[str, FunctionMemory]:
    """Per Relax function of a module that went through the whole lowering pipeline."""
    return {gv.name_hint: function_memory(f) for gv, f in lowered.functions_items()
            if isinstance(f, relax.Function)}
