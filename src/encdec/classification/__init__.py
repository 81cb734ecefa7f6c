"""Fine-tuning classifiers on encoder (or decoder-only) representations: the SuperGLUE protocol of the
T5Gemma paper (a linear head on the pooled final hidden states, all parameters trained)."""
