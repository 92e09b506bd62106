"""heedful feedback."""
