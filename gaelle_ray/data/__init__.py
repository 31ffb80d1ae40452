"""Data: demo set generation, source readers, Parquet shards, and the Ray Data pipeline."""
