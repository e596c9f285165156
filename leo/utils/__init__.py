"""Plumbing every layer shares: errors, atomic writes, hashing, device choice, compiling.

Nothing here knows about LEO; everything else may import it.
"""
