"""Generation: backends (transformers, fake), model loading, and the per-shard generation loop.

Imports io and the ground floor; torch and transformers only lazily inside the backends that need them.
"""
