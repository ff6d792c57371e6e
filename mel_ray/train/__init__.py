"""Distributed JD-CCL training of the CVaCPT model on Ray Train (`mel-ray train`)."""
