"""heedful's spine: config, stage registry, artifacts, runner, models and CLI.

The spine knows stages only through the registry; it imports no alignment method.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend warns at import time, in every stage log, that it could not fetch
# an optional kernel from the HF hub (`pip install kernels`); its built-in kernels work.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
