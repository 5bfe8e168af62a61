"""Relax passes edgecc runs between import and code generation, and the per-target pipeline."""
