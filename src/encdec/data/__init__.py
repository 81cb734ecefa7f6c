"""Text data: packaged passages and (later) training corpora."""
