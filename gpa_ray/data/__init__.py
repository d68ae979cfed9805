"""Corpora, schemas, the synthetic corpus and the Ray Data ingest pipeline."""
