"""gpa_ray: distributed audio-text retrieval on Ray (EnCodec ingest, GPA, AudioFormer)."""

__version__ = "0.1.0"
