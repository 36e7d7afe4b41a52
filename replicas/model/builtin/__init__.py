"""The built-in models: presets (`tiny`, `small`, `zaya1-8b`), random-weight checkpoints written
in the transformers layout with a BPE tokenizer trained here, and `random:` weights made on the
device. Serving the demo model uses them; nothing here is downloaded."""
