"""mel-ray: multimodal entity linking (JD-CCL + CVaCPT) as a distributed batch system on Ray."""

import os as _os

__version__ = "0.1.0"

# Ray reads its authentication mode once, when it is first imported: set the project's default (token
# authentication on) before any stage imports ray. An explicit RAY_AUTH_MODE from the user wins.
_os.environ.setdefault("RAY_AUTH_MODE", "token")
