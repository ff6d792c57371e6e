"""extract-features: frozen CLIP features for KB entities, mentions and synthetic views (MIMIC's inputs).

What is written (layout, columns, text templates, image handling, the key): docs/data-contract.md, "CLIP
features". The package, by responsibility:

* `inputs.py`: text templates and tokenising, image decoding and CLIP's image preprocessing (bit-exact), the
  per-unit preparation (the CPU stage; link prepares new mentions with it too);
* `encoder.py`: the CLIP encoder, a Ray Data actor and a plain local object alike;
* `plan.py`: what gets written under which key (model fingerprint, plan, work units);
* `shards.py`: shard assembly and writing, the manifest;
* `stage.py`: `extract_features`, running the plan on Ray Data (or locally).

Reading a feature set is mel_ray.feature_store's job (`read_shard`, `load_features` are re-exported here).
"""

from mel_ray.feature_store import MANIFEST, load_features, read_shard
from mel_ray.features.encoder import ENCODING_VERSION, Encoder
from mel_ray.features.inputs import (
    ATTRIBUTE_END,
    ATTRIBUTE_JOIN,
    BLANK_COLOR,
    ENTITY_TEMPLATE,
    MENTION_TEMPLATE,
    PREPROCESS_VERSION,
    blank_pixels,
    decode_image,
    entity_text,
    image_config,
    load_processor,
    mention_text,
    output_size,
    prepare_unit,
    preprocess_image,
    to_rgb,
    tokenize,
)
from mel_ray.features.plan import DEFAULT_MICRO_BATCH, DEFAULT_SHARD_ROWS, features_key, model_fingerprint
from mel_ray.features.shards import FORMAT_VERSION, SHARD_META
from mel_ray.features.stage import extract_features

__all__ = [
    "ATTRIBUTE_END", "ATTRIBUTE_JOIN", "BLANK_COLOR", "DEFAULT_MICRO_BATCH", "DEFAULT_SHARD_ROWS", "ENCODING_VERSION",
    "ENTITY_TEMPLATE", "FORMAT_VERSION", "MANIFEST", "MENTION_TEMPLATE", "PREPROCESS_VERSION", "SHARD_META", "Encoder",
    "blank_pixels", "decode_image",
    "entity_text", "extract_features", "features_key", "image_config", "load_features", "load_processor",
    "mention_text", "model_fingerprint", "output_size", "prepare_unit", "preprocess_image", "read_shard", "to_rgb",
    "tokenize",
]
