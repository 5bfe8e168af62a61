"""edgecc: compile ONNX models into compressed, fast, deployable modules for edge hardware.

The pipeline (see docs/architecture.md): frontend -> compress -> ir_passes -> schedules -> targets ->
runtime_bridge. `edgecc.build.build_artifact` is the entry point that ties the stages together.
"""

__version__ = "0.1.0"
