"""Many SAEs in one run: named one-SAE collectors sharing each step's checked tokens, and the hooks that feed them.

``collector.MultiSAECollector`` (any loop), ``callback.MultiSAECallback`` (Lightning; imports Lightning) and
``capture`` (latents as SAE modules return them, forward hooks open only on collected steps). The run folder they
write is ``samples_dir.run_folder``'s.
"""
