"""`python -m flowsteer ...` runs the flowsteer command (torchrun needs a module to launch)."""
import sys

from .cli import main

sys.exit(main())
