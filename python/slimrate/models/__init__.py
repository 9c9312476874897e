"""Small models built from configs in code (no downloads)."""
