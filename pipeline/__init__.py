"""heedful's spine: config, stage registry, artifacts, runner, models and CLI.

The spine knows stages only through the registry; it imports no alignment method.
"""

__version__ = "0.1.0"
