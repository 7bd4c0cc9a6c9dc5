"""Models: the dVAE, the transformer and CLIP loading."""
