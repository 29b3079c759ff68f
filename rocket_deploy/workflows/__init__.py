"""Orchestration: whatever drives several stages (compress -> export -> runtime) lives here, and only here.

Stages never import each other; a workflow imports their public functions. ``sweep``: profile once, compress at
several budgets, export each, benchmark side by side.
"""
