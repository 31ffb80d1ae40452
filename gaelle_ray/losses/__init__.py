"""Sinkhorn-Knopp codes, the three GAELLE losses and the embedding queues (pure functions)."""
