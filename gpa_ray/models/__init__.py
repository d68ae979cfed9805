"""Models of the pure core: encoders, AudioFormer, GPA prototypes and scorers."""
