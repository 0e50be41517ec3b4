"""``python -m lightning_sae_samples``: the same program as the ``lightning-sae-samples`` command."""

import sys

from lightning_sae_samples.cli import main

if __name__ == "__main__":
    sys.exit(main())
