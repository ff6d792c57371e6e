"""mel-ray: multimodal entity linking (JD-CCL + CVaCPT) as a distributed batch system on Ray."""

__version__ = "0.1.0"
