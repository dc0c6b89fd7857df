"""Measure what block-restricted training changed."""
