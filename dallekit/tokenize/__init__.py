"""Text and image tokenizers."""
