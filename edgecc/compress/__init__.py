"""Post-training compression (quantization, sparsity, low rank). Not implemented yet: see the issue tracker."""
