"""Explain latents in words with a language model, and score the explanations (``lightning-sae-samples explain``)."""
