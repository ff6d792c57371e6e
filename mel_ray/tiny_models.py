"""Tiny CLIP and tiny Stable Diffusion built from configs, for tests and the demo (nothing is downloaded).

They have the real classes and file layouts (`CLIPModel`/`CLIPProcessor`, `StableDiffusionPipeline`), so
every code path that loads `openai/clip-vit-base-patch32` or `stable-diffusion-v1-5` runs unchanged on them;
only the sizes differ (32x32 images, hidden size 32, 2 layers). Weights are random but fixed by the seed:
the same seed gives byte-identical safetensors files.

The tokenizer is a real byte-level BPE in CLIP's layout (256 byte symbols, their `</w>` word-final forms,
learned merges, `<|startoftext|>`/`<|endoftext|>`). Its merges are learned here from the demo data's
vocabulary so that MEL's 40-token text budget holds words, not single bytes; any text still tokenizes
because every byte is in the vocabulary.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

from mel_ray import storage

MARKER = "tiny_models.json"   # written last: its presence (with the same seed) means both models are complete
FORMAT_VERSION = 1            # bump when the architecture, the tokenizer or the demo vocabulary changes
N_MERGES = 600
IMAGE_SIZE = 32
HIDDEN = 32
MAX_POSITIONS = 77            # Stable Diffusion pads prompts to 77; MEL truncates to 40
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Common English on top of the demo vocabulary, so real sentences also get whole-word tokens.
_ENGLISH = """the of and a to in is was for on that with as by at from his her an it be this which or are
were has had have not but its their they one all new first also after who when more other into time than
two over some only then she he can most between city state world war year years people film band album
country born known during later under while about image photo picture view of close up showing an image
of school music song team player club party member series game river lake island house church street"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character map: every byte gets a visible symbol, so BPE never needs <unk>.
    Printable bytes map to themselves and come first (CLIP's vocabulary order); the rest get chr(256 + i)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return dict(zip(keep + others, [chr(b) for b in keep] + [chr(256 + i) for i in range(len(others))], strict=True))


# Close to CLIP's pre-tokenizer (letters runs, single digits, punctuation runs) for counting words.
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.UNICODE)


def learn_merges(texts: list[str], n_merges: int = N_MERGES) -> list[tuple[str, str]]:
    """Plain BPE learning on word counts. Ties are broken by the pair itself, so the result is deterministic;
    pair counts are updated only for the words a merge touches (a lazy heap finds the best pair)."""
    b2u = _bytes_to_unicode()
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for w in _WORD.findall(unicodedata.normalize("NFC", text).lower()):
            sym = [b2u[b] for b in w.encode("utf-8")]
            sym[-1] += "</w>"
            counts[tuple(sym)] += 1
    words = [list(w) for w in counts]
    freq = list(counts.values())
    pairs: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, sym in enumerate(words):
        for pair in pairwise(sym):
            pairs[pair] += freq[wi]
            where[pair].add(wi)
    heap = [(-c, pair) for pair, c in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    while heap and len(merges) < n_merges:
        neg, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -neg or best in seen:
            continue                          # stale entry: the count changed after it was pushed
        merges.append(best)
        seen.add(best)
        merged, touched = best[0] + best[1], set()
        for wi in sorted(where.pop(best)):
            sym, c = words[wi], freq[wi]
            for pair in pairwise(sym):
                pairs[pair] -= c
                touched.add(pair)
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and sym[i] == best[0] and sym[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            words[wi] = out
            for pair in pairwise(out):
                pairs[pair] += c
                where[pair].add(wi)
                touched.add(pair)
        for pair in sorted(touched):
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
            else:
                del pairs[pair]
    return merges


def _vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's order: bytes, bytes + </w>, one token per merge, then the two special tokens."""
    base = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in [*base, *(b + "</w>" for b in base), *("".join(m) for m in merges), BOS, EOS]:
        vocab.setdefault(tok, len(vocab))
    return vocab


def write_tokenizer_files(folder: Path, merges: list[tuple[str, str]]) -> None:
    """vocab.json + merges.txt, the plain-file layout older CLIPTokenizer versions load from."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_vocab(merges), ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tokenizer(merges: list[tuple[str, str]] | None = None):
    from transformers import CLIPTokenizer

    from mel_ray.demo_data import corpus

    merges = learn_merges([*corpus(), _ENGLISH]) if merges is None else merges
    # built in memory (transformers 5 API): from_pretrained would also save its own kwargs into the config
    return CLIPTokenizer(vocab=_vocab(merges), merges=merges, model_max_length=MAX_POSITIONS), merges


def _text_config(tokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "hidden_size": HIDDEN, "intermediate_size": 64, "projection_dim": HIDDEN,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": MAX_POSITIONS,
            # pooling takes the first eos position, so these must be the tokenizer's real ids
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def build_clip(folder: Path, tokenizer, seed: int) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    vision = {"hidden_size": HIDDEN, "intermediate_size": 64, "projection_dim": HIDDEN, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": 8}
    config = CLIPConfig(text_config=_text_config(tokenizer), vision_config=vision, projection_dim=HIDDEN)
    with torch.random.fork_rng(devices=[]):      # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.eval().save_pretrained(str(folder))
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(folder))
    images.save_pretrained(str(folder))      # preprocessor_config.json too, for loaders that look for it


def build_stable_diffusion(folder: Path, tokenizer, seed: int) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # one VAE downsampling (two blocks) -> 16x16 latents for 32x32 images; sample_size is the latent
        # side. Channels are as small as GroupNorm(8) allows: 8 images x 4 steps must take well under a
        # second on a CPU.
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=HIDDEN, attention_head_dim=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            norm_num_groups=8, sample_size=IMAGE_SIZE,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config(tokenizer)))
    # DPM-Solver++ (the config's default `synthesize.scheduler`) gives usable images in a few steps
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        algorithm_type="dpmsolver++", solver_order=2, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)


def _complete(output: str, seed: int) -> bool:
    marker = storage.join(output, MARKER)
    if not storage.exists(marker):
        return False
    done = storage.read_json(marker)
    return done.get("seed") == seed and done.get("format_version") == FORMAT_VERSION


def make_tiny_models(output: str, seed: int = 0) -> dict[str, str]:
    """Build (or find already built) OUTPUT/clip and OUTPUT/stable-diffusion; returns their paths.

    Built in a temporary folder and moved (local) or uploaded (s3://) into place, marker last, so a killed
    build is rebuilt next time instead of being used half-written.
    """
    output = str(output)
    paths = {"clip": storage.join(output, "clip"), "stable-diffusion": storage.join(output, "stable-diffusion")}
    if _complete(output, seed):
        return paths
    local_out = None if storage.is_s3(output) else Path(output).absolute()
    if local_out is not None:
        local_out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-models-", dir=local_out))
    try:
        tokenizer, merges = build_tokenizer()
        build_clip(tmp / "clip", tokenizer, seed)
        build_stable_diffusion(tmp / "stable-diffusion", tokenizer, seed)
        for folder in (tmp / "clip", tmp / "stable-diffusion" / "tokenizer"):
            write_tokenizer_files(folder, merges)
        storage.delete(storage.join(output, MARKER))
        for name in ("clip", "stable-diffusion"):
            if local_out is None:
                for rel in storage.list_files(str(tmp / name)):
                    storage.write_bytes(storage.join(paths[name], rel), (tmp / name / rel).read_bytes())
            else:
                shutil.rmtree(local_out / name, ignore_errors=True)
                os.replace(tmp / name, local_out / name)
        storage.write_json(storage.join(output, MARKER), {"seed": seed, "format_version": FORMAT_VERSION,
                                                          "paths": paths})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


# ------------------------------------------------------------------------------ a tiny BERT (models.text_encoder)

BERT_HIDDEN = 24               # not HIDDEN: a text encoder's widths differ from CLIP's, as BERT-base's 768 from 512
BERT_POSITIONS = 64            # >= MEL's 40-token text budget
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def bert_vocab(texts: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary: the special tokens, every word of `texts` as BERT's own normaliser and
    pre-tokenizer split them (lower-cased, accents stripped, punctuation apart), then every character they hold
    and ASCII's, alone and as a `##` continuation, so any text tokenises into pieces rather than [UNK]."""
    import string

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))})
    chars = sorted({c for w in words for c in w} | set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab: dict[str, int] = {}
    for token in [*BERT_SPECIALS, *words, *chars, *(f"##{c}" for c in chars)]:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_tiny_bert(folder: str | Path, seed: int = 0) -> str:
    """Write a tiny BertModel (hidden BERT_HIDDEN, 2 layers, BERT_POSITIONS positions, a pooler as real BERT
    checkpoints have) and its real BertTokenizer (WordPiece over the demo vocabulary, bert_vocab) to `folder`
    with save_pretrained; returns the folder. Weights are random but fixed by the seed. make_tiny_models does not
    build it (its outputs and FORMAT_VERSION are the demo's cache key)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from mel_ray.demo_data import corpus

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab=bert_vocab([*corpus(), _ENGLISH]), do_lower_case=True,
                              model_max_length=BERT_POSITIONS)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=BERT_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=BERT_POSITIONS,
                        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):      # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = BertModel(config)
    model.eval().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)
