"""External checkpoint formats: Hugging Face Gemma (decoder-only sources) and T5Gemma / T5Gemma 2."""
