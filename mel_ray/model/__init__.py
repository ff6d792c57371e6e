"""The JD-CCL + CVaCPT model on top of the MIMIC matcher (paper §4; Luo et al. 2023).

- `matcher.py`: MIMIC's three interaction units (TGLU, VDLU, CMFU) scoring mentions against entities.
- `cvacpt.py`: the Contextual Visual-aid Controllable Patch Transform (eq. 5-12) on the mention image.
- `mel_model.py`: projections + CVaCPT + matcher, and the entity-side precompute used by evaluation.
- `losses.py`: MIMIC's sum of cross-entropies with JD-CCL column masks (eq. 1, 4).
"""

from mel_ray.model.mel_model import MELModel, ModelDims, Side

__all__ = ["MELModel", "ModelDims", "Side"]
