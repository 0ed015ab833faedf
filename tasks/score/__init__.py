"""Scoring and selection: scorers, judges, the latent-attribution scorer, Best-of-N strategies, pairing.

Imports generate (to load models), io and the ground floor.
"""
