"""Target registry: name -> TVM target, ISA features, cross toolchain, emulator."""

from edgecc.targets.registry import TargetSpec, ToolchainStatus, all_targets, get_target, target_names

__all__ = ["TargetSpec", "ToolchainStatus", "all_targets", "get_target", "target_names"]
