"""Adaptation pretraining: configuration, data, loss, optimizer, checkpointing, metrics, distributed set-up, loop."""
