"""Data: demo set, source readers, Parquet shards and preparing them, the multi-crop views
and their colour augmentation, and the Ray Data pipeline."""
