"""`python -m launcher.gpus [--json | --record]`: what NVML discovery sees."""

import sys

from launcher.gpus.discovery import main

sys.exit(main())
