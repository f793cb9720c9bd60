"""Building CLEAR-style streams from a timestamped image pool (CLIP retrieval)."""
