"""The target registry: one `TargetSpec` per name a user can pass to `--target`.

A spec is everything edgecc needs to know about a target in one place: the TVM target, the ISA features
and vector width that schedules read (never constants scattered in code), the cross toolchain that links
the library, how to run its code on this machine (natively, under qemu-user, or not at all) and the
instructions whose presence in the disassembly proves the vector unit is used.

Vendors add targets from their own packages through the `edgecc.targets` entry point group: the entry
point must resolve to a `TargetSpec` or a zero-argument callable returning one (or a list of them).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from edgecc.errors import EdgeccError


@dataclass(frozen=True)
class TargetSpec:
    """What edgecc knows about one deployment target."""

    name: str
    description: str
    arch: str  # "x86_64", "aarch64", "riscv64" (ELF machine of the library), or "cuda"
    tvm_target: dict[str, Any]  # JSON-dict form: TVM 0.27 rejects "llvm -mtriple=..." strings
    features: tuple[str, ...] = ()  # ISA features schedules may rely on ("avx2", "neon", "dotprod", "rvv", ...)
    vector_bits: int = 128  # width of one SIMD register, for vectorised loops
    num_cores: int = 4  # threads the runtime is expected to use; parallel loops are split for it
    cross_compiler: str | None = None  # C++ driver that links the shared library; None = host compiler
    debian_packages: tuple[str, ...] = ()  # what `apt-get install` brings the toolchain/emulator
    emulator: tuple[str, ...] = ()  # argv prefix that runs a binary of this arch here (qemu-user)
    device: str = "cpu"  # TVM device kind the module runs on
    vector_mnemonics: tuple[str, ...] = ()  # instructions that show the vector unit in the disassembly
    objdump: tuple[str, ...] = ("objdump", "-d")  # a disassembler that decodes this ISA
    plugin: str | None = None  # distribution name of the vendor package that registered it
    # -- vendor plugins (issue #4 item 5): see edgecc/targets/byoc.py and docs/targets.md --
    byoc: str | None = None  # "module:attr" of an edgecc.targets.byoc.ByocSpec: ops offloaded to a vendor codegen
    rpc_key: str | None = None  # key of the TVM RPC server on the target's boards (`edgecc tune --rpc ... --key`)
    extra: dict[str, Any] = field(default_factory=dict)

    # -- derived facts -------------------------------------------------------------------------

    @property
    def is_cross(self) -> bool:
        return self.device == "cpu" and self.arch != platform.machine()

    def missing_host_features(self) -> list[str]:
        """ISA features this target's code needs that this machine's CPU lacks (same-arch targets only)."""
        if self.is_cross or self.device != "cpu" or self.arch != "x86_64":
            return []
        flags = host_cpu_flags()
        return [f for f in self.features if f not in flags]

    @property
    def fp32_lanes(self) -> int:
        """How many float32 values one vector register holds."""
        return max(1, self.vector_bits // 32)

    def tvm(self):
        """The `tvm.target.Target` (imported lazily: `edgecc targets` should not pay for TVM)."""
        import tvm

        config = dict(self.tvm_target)
        if config.get("kind") == "llvm":
            config.setdefault("num-cores", self.num_cores)
        return tvm.target.Target(config)

    def sdk_status(self) -> "ToolchainStatus":
        from edgecc.targets.toolchain import toolchain_status

        return toolchain_status(self)


@dataclass(frozen=True)
class ToolchainStatus:
    """Whether this machine can build for and run a target, and what to install otherwise."""

    can_build: bool
    can_run: bool
    missing: tuple[str, ...]
    install_hint: str | None
    how_it_runs: str


# ---------------------------------------------------------------------------------------------------
# Built-in targets
# ---------------------------------------------------------------------------------------------------

_AARCH64_QEMU = ("qemu-aarch64", "-L", "/usr/aarch64-linux-gnu")
_AARCH64_DEBS = ("g++-aarch64-linux-gnu", "qemu-user")
_RISCV_QEMU = ("qemu-riscv64", "-cpu", "rv64,v=true,vlen=128,vext_spec=v1.0", "-L", "/usr/riscv64-linux-gnu")
_RISCV_DEBS = ("g++-riscv64-linux-gnu", "qemu-user")
_NEON_MNEMONICS = ("fmla", "ld1", "ldr\tq", "ldp\tq")


def host_cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _host_spec() -> TargetSpec:
    """Detect the machine edgecc runs on (TVM's LLVM picks the CPU model; /proc/cpuinfo the features)."""
    machine = platform.machine()
    flags = host_cpu_flags()
    try:
        import tvm

        detected = tvm.target.Target.from_device(tvm.cpu()).export()
        mcpu = str(detected.get("mcpu", "")) or None
        mtriple = str(detected.get("mtriple", "")) or None
    except Exception:  # noqa: BLE001 - TVM missing or odd host: fall back to a generic target
        mcpu, mtriple = None, None
    config: dict[str, Any] = {"kind": "llvm"}
    if mtriple:
        config["mtriple"] = mtriple
    if mcpu:
        config["mcpu"] = mcpu
    if machine == "x86_64":
        known = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                 "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")
        features = tuple(f for f in known if f in flags)
        vector_bits = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
        mnemonics = ("vfmadd", "zmm") if vector_bits == 512 else ("vfmadd", "ymm")
    elif machine == "aarch64":
        features = tuple(sorted({"neon"} | ({"dotprod"} if "asimddp" in flags else set())
                                | ({"i8mm"} if "i8mm" in flags else set())))
        vector_bits, mnemonics = 128, _NEON_MNEMONICS
    else:
        features, vector_bits, mnemonics = (), 128, ()
    return TargetSpec(
        name="host",
        description=f"this machine ({machine}, {mcpu or 'generic CPU'}), detected",
        arch=machine,
        tvm_target=config,
        features=features,
        vector_bits=vector_bits,
        num_cores=_host_cores(),
        vector_mnemonics=mnemonics,
    )


_BUILTIN: tuple[TargetSpec, ...] = (
    TargetSpec(
        name="x86-avx2",
        description="x86-64 with AVX2 + FMA (Haswell and newer, Zen 1+)",
        arch="x86_64",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
        features=("avx", "avx2", "fma", "f16c"),
        vector_bits=256,
        vector_mnemonics=("vfmadd", "ymm"),
    ),
    TargetSpec(
        name="x86-avxvnni",
        description="x86-64 with AVX2 + AVX-VNNI, no AVX-512 (Alder Lake, Raptor Lake, Meteor Lake laptops and "
                    "desktops): int8 dot products on 256-bit vectors",
        arch="x86_64",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"},
        features=("avx", "avx2", "fma", "f16c", "avx_vnni"),
        vector_bits=256,
        vector_mnemonics=("vfmadd", "ymm"),
    ),
    TargetSpec(
        name="x86-avx512",
        description="x86-64 with AVX-512 F/BW/VL/VNNI (Cascade Lake and newer, Zen 4+)",
        arch="x86_64",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"},
        features=("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
        vector_bits=512,
        vector_mnemonics=("vfmadd", "zmm"),
    ),
    TargetSpec(
        name="arm-neon",
        description="64-bit Arm (Armv8-A) with NEON, e.g. Cortex-A53/A72, Raspberry Pi 3/4",
        arch="aarch64",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        features=("neon",),
        vector_bits=128,
        cross_compiler="aarch64-linux-gnu-g++",
        debian_packages=_AARCH64_DEBS,
        emulator=_AARCH64_QEMU,
        vector_mnemonics=_NEON_MNEMONICS,
        objdump=("aarch64-linux-gnu-objdump", "-d"),
    ),
    TargetSpec(
        name="arm-dotprod",
        description="Armv8.2-A with NEON + dot product, e.g. Cortex-A55/A76, Raspberry Pi 5",
        arch="aarch64",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                    "mattr": ["+neon", "+dotprod"]},
        features=("neon", "dotprod", "fp16"),
        vector_bits=128,
        cross_compiler="aarch64-linux-gnu-g++",
        debian_packages=_AARCH64_DEBS,
        emulator=_AARCH64_QEMU,
        vector_mnemonics=_NEON_MNEMONICS,
        objdump=("aarch64-linux-gnu-objdump", "-d"),
    ),
    TargetSpec(
        name="arm-i8mm",
        description="Armv8.6-A with NEON + dotprod + int8 matrix multiply (i8mm), e.g. Cortex-A510/A715",
        arch="aarch64",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                    "mattr": ["+v8.6a", "+neon", "+dotprod", "+i8mm"]},
        features=("neon", "dotprod", "fp16", "i8mm"),
        vector_bits=128,
        cross_compiler="aarch64-linux-gnu-g++",
        debian_packages=_AARCH64_DEBS,
        emulator=_AARCH64_QEMU,
        vector_mnemonics=_NEON_MNEMONICS,
        objdump=("aarch64-linux-gnu-objdump", "-d"),
    ),
    TargetSpec(
        name="riscv64-rvv",
        description="64-bit RISC-V RV64GCV with the vector extension 1.0 (VLEN 128), e.g. SpacemiT K1",
        arch="riscv64",
        tvm_target={"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mabi": "lp64d",
                    "mattr": ["+64bit", "+m", "+a", "+f", "+d", "+c", "+v"]},
        features=("rvv",),
        vector_bits=128,
        cross_compiler="riscv64-linux-gnu-g++",
        debian_packages=_RISCV_DEBS,
        emulator=_RISCV_QEMU,
        vector_mnemonics=("vsetvli", "vle32", "vfmacc"),
        objdump=("llvm-objdump", "-d", "--mattr=+v"),
    ),
    TargetSpec(
        name="cuda",
        description="NVIDIA GPU via CUDA (compile-only unless a GPU is present)",
        arch="cuda",
        tvm_target={"kind": "cuda", "arch": "sm_80"},
        features=("cuda",),
        vector_bits=128,
        device="cuda",
        extra={"host": {"kind": "llvm"}},
    ),
)


def _load_plugins() -> list[TargetSpec]:
    """Targets from installed vendor packages (entry point group `edgecc.targets`)."""
    specs: list[TargetSpec] = []
    for entry in metadata.entry_points(group="edgecc.targets"):
        try:
            obj: Any = entry.load()
            if callable(obj) and not isinstance(obj, TargetSpec):
                obj = obj()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break edgecc
            raise EdgeccError(
                f"target plugin '{entry.name}' ({entry.value}) failed to load: {exc}",
                "fix or uninstall the package that provides it",
            ) from exc
        for spec in obj if isinstance(obj, (list, tuple)) else [obj]:
            if not isinstance(spec, TargetSpec):
                raise EdgeccError(
                    f"target plugin '{entry.name}' returned {type(spec).__name__}, not an edgecc TargetSpec",
                    "return edgecc.targets.TargetSpec objects from the entry point",
                )
            dist = getattr(entry, "dist", None)
            specs.append(spec if spec.plugin else _with_plugin(spec, dist.name if dist else entry.name))
    return specs


def _with_plugin(spec: TargetSpec, plugin: str) -> TargetSpec:
    from dataclasses import replace

    return replace(spec, plugin=plugin)


def host_target() -> TargetSpec:
    """This machine's target (for plugins that derive a spec from it: `get_target` would recurse)."""
    return _host_spec()


def all_targets() -> list[TargetSpec]:
    """Every target edgecc knows: host, the built-ins, then vendor plugins."""
    specs = [_host_spec(), *_BUILTIN]
    names = {s.name for s in specs}
    for spec in _load_plugins():
        if spec.name in names:
            raise EdgeccError(
                f"target plugin '{spec.plugin}' registers '{spec.name}', which already exists",
                "rename the target in the plugin",
            )
        names.add(spec.name)
        specs.append(spec)
    return specs


def target_names() -> list[str]:
    return [s.name for s in all_targets()]


def get_target(name: str) -> TargetSpec:
    """Look a target up by name; an unknown name is a user error that lists the valid ones.

    Built-in names resolve without loading the plugins, so a broken vendor package (a stale editable
    install, a missing module) stops only the builds that ask for a plugin target, with its own error."""
    for spec in (_host_spec(), *_BUILTIN):
        if spec.name == name:
            return spec
    for spec in all_targets():
        if spec.name == name:
            return spec
    raise EdgeccError(
        f"unknown target '{name}'",
        "use one of: " + ", ".join(target_names()) + " (see `edgecc targets`)",
    )

