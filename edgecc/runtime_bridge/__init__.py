"""Artifacts on disk: layout, export, loading, running (native or emulated) and verification."""
