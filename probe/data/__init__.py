"""Builders for the capability suite: source fetching, Brown parsing and one module per capability.

The public entry points live in `probe.suite`; the modules here are its internals.
"""
