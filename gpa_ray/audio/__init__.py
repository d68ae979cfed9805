"""Audio front end: decoding, resampling, log-mel, SpecAugment, EnCodec tokenizer (pure core)."""
