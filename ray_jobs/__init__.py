"""heedful ray_jobs."""
