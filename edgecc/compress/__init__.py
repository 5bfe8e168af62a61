"""Post-training compression. Quantization: `schemes` (what "w4g32" means), `rtn` (round-to-nearest +
bit packing), `recipe` (which layer gets which scheme), `quantize` (the Relax rewrite pass used by
`edgecc build --quantize`). Sparsity and low rank: not yet. Design: docs/compression.md."""
