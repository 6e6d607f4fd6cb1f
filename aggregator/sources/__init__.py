"""Inputs: one module per source type."""
