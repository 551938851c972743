"""Cohort quality metrics: feature extractors, fidelity, similarity, memorization, utility (TSTR).

Each module holds short pure functions on tensors; :mod:`meddiff.evaluate` wires them together.
"""
