"""heedful serving."""
