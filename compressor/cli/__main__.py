"""`python -m compressor.cli` (what `accelerate launch -m compressor.cli train ...` runs)."""

import sys

from compressor.cli import main

sys.exit(main())
