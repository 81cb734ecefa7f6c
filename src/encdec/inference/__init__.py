"""Fast generation: the continuous-batching decoding engine, per-row sampling and int8 weights."""
