"""heedful trainers."""
