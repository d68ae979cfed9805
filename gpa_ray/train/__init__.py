"""Ray Train layer: distributed helpers, per-worker loops and TorchTrainer builders."""
