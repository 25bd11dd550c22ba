"""Data shared by the stages: record files (JSONL/Parquet), prompt sets and their sampling order, the
offline demo data."""
