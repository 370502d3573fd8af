"""Reproducible research experiments (Multi30k comparisons of the docs)."""
