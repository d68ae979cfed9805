"""Hyperparameter sweeps of GPA training on Ray Tune (`jobs/sweep_gpa.py`).

`space` turns the `sweep` config section into a Tune search space and each trial's
config; `runner` runs the Tuner (each trial a Ray Train run, ASHA early stopping) and
writes the sweep's summary; `bias_metrics` scores A2T under the Sinkhorn text bias when
the sweep varies `sinkhorn.epsilon`.
"""
