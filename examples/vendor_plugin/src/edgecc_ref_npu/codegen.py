"""The reference NPU's BYOC: which Relax ops it takes (patterns) and how they become calls into its library.

Partitioning (`FuseOpsByPattern`, run by edgecc before legalization) wraps every accepted op in a function
with `Codegen="ref_npu"`. `RunCodegen` then calls the global function `relax.ext.ref_npu`, registered
below, with all of them; it returns one C source module holding

* the library itself (`csrc/ref_npu.c`, its functions made `static`), and
* one wrapper per partitioned function, with TVM FFI's packed-call C ABI
  (`int __tvm_ffi_<symbol>(void*, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result)`): it takes
  the input tensors and the output tensor (destination-passing style, as `call_dps_packed` passes them),
  and calls the library with the shapes baked in at compile time.

`export_library` (`edgecc build`; the in-process VM's `jit()` in `edgecc validate`) writes the module as a
`.c` file and compiles it with the host C++ compiler into `model.so`, next to the TVM kernels of the ops
left on the CPU. The artifact needs nothing at run time beyond the TVM runtime. `ref_npu_call_count(kind)`
is exported from the same library: tests read it to prove which layers ran in the NPU library.

Why a C source module: TVM 0.27's wheel has no vendor codegens built in (the DNNL / example NPU backends
need TVM built from source with their CMake flags), but `runtime.CSourceModuleCreate` is there and
`export_library` compiles such modules with the system compiler, so a pure-Python plugin can generate C.
"""

from __future__ import annotations

from importlib import resources

import numpy as np

CODEGEN = "ref_npu"

# Counter kinds of ref_npu_call_count (the enum in ref_npu.h).
KINDS = {"matmul_f32": 0, "conv2d_f32": 1, "matmul_i8": 2, "conv2d_i8": 3}

# ONNX ops whose Relax form the patterns below accept (for the target description and the docs).
OFFLOADS = ("MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger")


# ---------------------------------------------------------------------------------------------------
# Patterns: what the NPU accepts
# ---------------------------------------------------------------------------------------------------


def _tensor(expr):
    """(shape as ints, dtype) of a Relax expression, or None when not a statically shaped tensor."""
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    dtype = getattr(ty, "dtype", None)
    if shape is None or dtype is None:
        return None
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError):  # symbolic dims: the library wants them known at compile time
        return None
    return dims, str(dtype)


def _matmul_ok(a, b, out, in_dtype: str, out_dtype: str) -> bool:
    """Static shapes, both operands at least 2-D, and each operand either 2-D or with exactly the output's
    batch dims (the broadcasts the library's batch stride can express). Everything else stays on the CPU."""
    if a is None or b is None or out is None:
        return False
    (sa, da), (sb, db), (so, do) = a, b, out
    if da != in_dtype or db != in_dtype or do != out_dtype or len(sa) < 2 or len(sb) < 2:
        return False
    batch = so[:-2]
    return all(len(s) == 2 or s[:-2] == batch for s in (sa, sb)) and sa[-1] == sb[-2]


def _conv_ok(call, x, w, out, in_dtype: str, out_dtype: str) -> bool:
    if x is None or w is None or out is None:
        return False
    attrs = call.attrs
    layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout or attrs.data_layout))
    return (layouts == ("NCHW", "OIHW", "NCHW") and x[1] == in_dtype and w[1] == in_dtype
            and out[1] == out_dtype and len(x[0]) == 4 and len(w[0]) == 4)


def _check_matmul(dtype_in: str, dtype_out: str, cast_inputs: bool):
    def check(ctx) -> bool:
        call = ctx.annotated_expr["root"]
        a, b = call.args
        if cast_inputs:  # int8: matmul(astype(a, int32), astype(b, int32)); the casts' inputs enter the NPU
            a, b = ctx.annotated_expr["lhs"].args[0], ctx.annotated_expr["rhs"].args[0]
        return _matmul_ok(_tensor(a), _tensor(b), _tensor(call), dtype_in, dtype_out)

    return check


def _check_conv(dtype_in: str, dtype_out: str, cast_inputs: bool):
    def check(ctx) -> bool:
        call = ctx.annotated_expr["root"]
        x, w = call.args
        if cast_inputs:
            x, w = ctx.annotated_expr["lhs"].args[0], ctx.annotated_expr["rhs"].args[0]
        return _conv_ok(call, _tensor(x), _tensor(w), _tensor(call), dtype_in, dtype_out)

    return check


def patterns() -> list:
    """FusionPatterns, most specific first (FuseOpsByPattern tries them in order)."""
    from tvm.relax.dpl import is_op, wildcard
    from tvm.relax.transform import FusionPattern

    out = []
    for name, op, kind in (("matmul", "relax.matmul", _check_matmul), ("conv2d", "relax.nn.conv2d", _check_conv)):
        lhs, rhs = is_op("relax.astype")(wildcard()), is_op("relax.astype")(wildcard())
        root = is_op(op)(lhs, rhs)
        out.append(FusionPattern(f"{CODEGEN}.{name}_i8", root, {"root": root, "lhs": lhs, "rhs": rhs},
                                 kind("int8", "int32", True)))
        root = is_op(op)(wildcard(), wildcard())
        out.append(FusionPattern(f"{CODEGEN}.{name}_f32", root, {"root": root}, kind("float32", "float32", False)))
    return out


# ---------------------------------------------------------------------------------------------------
# Codegen: partitioned functions -> C source module
# ---------------------------------------------------------------------------------------------------

_PRELUDE = r"""
/* Generated by edgecc_ref_npu (relax.ext.ref_npu): the reference NPU library + one TVM FFI wrapper per
 * offloaded op. Compiled by TVM's export_library with the host C++ compiler. */
#include <stdint.h>
#include <tvm/ffi/c_api.h>
#define REF_NPU_API static
"""

_HELPERS = r"""
static DLTensor* ref_npu_tensor(const TVMFFIAny* arg) {
  if (arg->type_index == kTVMFFIDLTensorPtr) return (DLTensor*)arg->v_ptr;
  if (arg->type_index == kTVMFFITensor) return TVMFFITensorGetDLTensorPtr(arg->v_obj);
  return 0;
}

static void* ref_npu_data(DLTensor* t) { return (char*)t->data + t->byte_offset; }

static int ref_npu_args(const char* fn, const TVMFFIAny* args, int32_t num_args, int32_t expected,
                        DLTensor** out) {
  if (num_args != expected) {
    TVMFFIErrorSetRaisedFromCStr("ValueError", fn);
    return -1;
  }
  for (int32_t i = 0; i < num_args; ++i) {
    out[i] = ref_npu_tensor(&args[i]);
    if (out[i] == 0 || out[i]->device.device_type != kDLCPU) {
      TVMFFIErrorSetRaisedFromCStr("TypeError", fn);
      return -1;
    }
  }
  return 0;
}

#ifdef __cplusplus
extern "C" {
#endif

/* ref_npu_call_count(kind) -> int: calls of one kernel kind since the library was loaded. */
TVM_FFI_DLL_EXPORT int __tvm_ffi_ref_npu_call_count(void* self, const TVMFFIAny* args, int32_t num_args,
                                                    TVMFFIAny* result) {
  (void)self;
  if (num_args != 1 || args[0].type_index != kTVMFFIInt) {
    TVMFFIErrorSetRaisedFromCStr("TypeError", "ref_npu_call_count(kind: int)");
    return -1;
  }
  result->type_index = kTVMFFIInt;
  result->zero_padding = 0;
  result->v_int64 = (int64_t)ref_npu_call_count((int)args[0].v_int64);
  return 0;
}
"""

_EPILOGUE = r"""
#ifdef __cplusplus
}  /* extern "C" */
#endif
"""

COUNT_FUNCTION = "ref_npu_call_count"


def _library_source() -> str:
    csrc = resources.files(__package__) / "csrc"
    header = (csrc / "ref_npu.h").read_text(encoding="utf-8")
    source = (csrc / "ref_npu.c").read_text(encoding="utf-8").replace('#include "ref_npu.h"', "")
    return header + "\n" + source


def _find(func, predicate):
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if predicate(e) else None)
    return found


def _composite(func):
    from tvm import relax

    inner = _find(func, lambda e: isinstance(e, relax.Function) and e.attrs is not None and "Composite" in e.attrs)
    if len(inner) != 1:
        raise ValueError(f"ref_npu: expected one composite function in {func.attrs['global_symbol']}")
    return inner[0], str(inner[0].attrs["Composite"])


def _call_of(composite, op_name: str):
    import tvm
    from tvm import relax

    calls = _find(composite, lambda e: isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
                  and e.op.name == op_name)
    return calls[0]


def _wrapper(symbol: str, body: str, num_args: int) -> str:
    return (f"TVM_FFI_DLL_EXPORT int __tvm_ffi_{symbol}(void* self, const TVMFFIAny* args, int32_t num_args, "
            f"TVMFFIAny* result) {{\n"
            f"  DLTensor* t[{num_args}];\n  (void)self;\n"
            f"  if (ref_npu_args(\"{symbol}: bad arguments\", args, num_args, {num_args}, t) != 0) return -1;\n"
            f"{body}"
            f"  result->type_index = kTVMFFINone;\n  result->zero_padding = 0;\n  result->v_int64 = 0;\n"
            f"  return 0;\n}}\n")


def _matmul_body(func, kind: str) -> str:
    (sa, _), (sb, _) = (_tensor(p) for p in func.params)
    so, _ = _tensor(func.body)
    batch = int(np.prod(so[:-2], dtype=np.int64)) if len(so) > 2 else 1
    m, k, n = sa[-2], sa[-1], sb[-1]
    stride_a = m * k if len(sa) > 2 else 0
    stride_b = k * n if len(sb) > 2 else 0
    ctype, otype = ("float", "float") if kind == "f32" else ("int8_t", "int32_t")
    return (f"  ref_npu_matmul_{kind}((const {ctype}*)ref_npu_data(t[0]), (const {ctype}*)ref_npu_data(t[1]), "
            f"({otype}*)ref_npu_data(t[2]), {batch}, {m}, {n}, {k}, {stride_a}, {stride_b});\n")


def _conv_body(func, composite, kind: str) -> str:
    call = _call_of(composite, "relax.nn.conv2d")
    (sx, _), (sw, _) = (_tensor(p) for p in func.params)
    so, _ = _tensor(func.body)
    a = call.attrs
    strides, pads, dil = [int(v) for v in a.strides], [int(v) for v in a.padding], [int(v) for v in a.dilation]
    if len(pads) == 2:
        pads = pads * 2
    fields = dict(n=sx[0], c=sx[1], h=sx[2], w=sx[3], o=sw[0], kh=sw[2], kw=sw[3], oh=so[2], ow=so[3],
                  stride_h=strides[0], stride_w=strides[1], pad_top=pads[0], pad_left=pads[1],
                  dilation_h=dil[0], dilation_w=dil[1], groups=int(a.groups))
    init = ", ".join(str(v) for v in fields.values())  # positional: the order of ref_npu_conv2d_params
    ctype, otype = ("float", "float") if kind == "f32" else ("int8_t", "int32_t")
    return (f"  static const ref_npu_conv2d_params p = {{{init}}};\n"
            f"  ref_npu_conv2d_{kind}((const {ctype}*)ref_npu_data(t[0]), (const {ctype}*)ref_npu_data(t[1]), "
            f"({otype}*)ref_npu_data(t[2]), &p);\n")


def generate_source(functions) -> tuple[str, list[str]]:
    """C source and exported function names for the partitioned functions."""
    parts = [_PRELUDE, _library_source(), _HELPERS]
    names = [COUNT_FUNCTION]
    for func in functions:
        symbol = str(func.attrs["global_symbol"])
        composite, pattern = _composite(func)
        op, kind = pattern.split(".", 1)[1].rsplit("_", 1)
        if len(func.params) != 2:
            raise ValueError(f"ref_npu: {symbol} has {len(func.params)} inputs, expected 2")
        body = _matmul_body(func, kind) if op == "matmul" else _conv_body(func, composite, kind)
        parts.append(_wrapper(symbol, body, 3))
        names.append(symbol)
    parts.append(_EPILOGUE)
    return "\n".join(parts), names


def codegen(functions, options, constant_names):
    """`relax.ext.ref_npu`: partitioned Relax functions -> [C source module]."""
    import tvm

    source, names = generate_source(functions)
    create = tvm.get_global_func("runtime.CSourceModuleCreate")
    return [create(source, "c", names, [])]


def register() -> None:
    """Register `relax.ext.ref_npu` (idempotent; edgecc calls it before RunCodegen)."""
    import tvm

    if tvm.get_global_func(f"relax.ext.{CODEGEN}", allow_missing=True) is None:
        tvm.register_global_func(f"relax.ext.{CODEGEN}", codegen)
