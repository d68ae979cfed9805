"""Helpers for tests, benchmarks and demos: tiny real models, real test data, real services.

These are real components (a real Ray cluster on loopback, a real S3 HTTP endpoint from
moto's server, real audio from the shared data folder), sized for a 2-core machine:

- `models`: tiny text, audio, AudioFormer and GPA models, their configs and random
  inputs, and tiny saved checkpoints.
- `data`: where the real test audio lives; ESC-50 clip tables, clip shards and caption
  files made from it.
- `synthetic`: made-up index contents (clip rows without audio, random unit embeddings).
- `services`: the shared embedded Ray, the local S3 server, free loopback ports.
- `cluster`: a `ray start --head` cluster on loopback and the processes it started.
- `jobs`: the `main` of a `jobs/<name>.py` script.
- `parity`: Ray Train workers that the training-parity tests run.
"""
