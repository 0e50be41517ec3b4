"""A writer that commits saves into one samples directory in a loop, as a training run does (run by tests).

Usage: ``save_loop_script.py DIR SAVES [PAUSE]``. Each save collects one more batch (step = save number, activations
growing, so the saved features change and stale feature files are removed) and prints its step once committed,
then waits PAUSE seconds (default 0: saves back to back).
"""

import sys
import time

import torch

from lightning_sae_samples import ActivationSampleCollector


def main(dirpath: str, saves: int, pause: float = 0.0) -> None:
    gen = torch.Generator().manual_seed(0)
    collector = ActivationSampleCollector(num_latents=24, max_samples_per_feature=4, context_size=2,
                                          activation_threshold=0.3, top_features_to_save=6,
                                          samples_per_feature_to_save=2, write_report=False)
    for step in range(saves):
        tokens = torch.randint(0, 40, (2, 8), generator=gen)
        collector.update(tokens, latents=torch.rand(2, 8, 24, generator=gen) * (1 + step), step=step)
        collector.save(dirpath, global_step=step)
        print(step, flush=True)
        time.sleep(pause)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
