"""Data: reading text, the token cache, splitting and batching, what a run trains on."""
