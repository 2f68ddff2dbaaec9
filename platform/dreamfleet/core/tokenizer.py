"""A small CLIP-format BPE tokenizer built locally, for the tiny and toy base models.

No machine here reaches a model hub, so tiny models cannot borrow a real CLIP tokenizer.
This module learns byte-level BPE merges (CLIP's format: byte-to-unicode alphabet,
``</w>`` end-of-word suffix) from a fixed word list with a deterministic trainer, so the
same vocab comes out on every machine. Common prompt words become single tokens early
(low ids); a set of rare pseudo-words is merged last (high ids), which gives the
DreamBooth identifier search a pool of genuinely rare single tokens, as in the paper.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import tempfile
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words of DreamBench prompts and classes, the toy world's vocabulary, and generic prompt words.
COMMON_WORDS = ["a", "an", "the", "of", "in", "on", "at", "with", "and", "photo", "picture", "image", "render", "painting", "drawing", "style", "close", "up", "view", "top", "bottom", "left", "right", "center", "middle", "small", "large", "big", "tiny", "huge", "front", "back", "side", "above", "below", "around", "it", "its", "is", "are", "wearing", "floating", "shaped", "background", "field", "street", "road", "floor", "fabric", "rug", "forest", "mountain", "city", "house", "tree", "leaves", "autumn", "eiffel", "tower", "water", "ocean", "milk", "grass", "sunflowers", "mirror", "sidewalk", "crowded", "dirt", "white", "jungle", "snow", "beach", "cobblestone", "wooden", "wheat", "hat", "santa", "rainbow", "scarf", "monocle", "chef", "outfit", "firefighter", "police", "glasses", "shirt", "wizard", "shiny", "wet", "cube", "night", "day", "sky", "sunset", "desert", "space", "moon", "table", "red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "brown", "grey", "gray", "gold", "silver", "cyan", "teal", "solid", "striped", "stripes", "dotted", "dots", "checkered", "checks", "plain", "spotted", "pattern", "emblem", "star", "heart", "ring", "cross", "ball", "box", "kite", "cup", "dog", "cat", "backpack", "bowl", "can", "candle", "clock", "sneaker", "toy", "boot", "teapot", "vase", "cartoon", "stuffed", "animal", "plushie", "bear", "sloth", "wolf", "duck", "robot", "car", "monster", "emoji", "poop", "berry", "fancy", "colorful", "sunglasses", "person", "man", "woman", "face", "bag", "bottle", "chair", "lamp", "book", "flower", "bird", "fish", "horse", "shoe"]

# Rare pseudo-words: identifier candidates. They appear once in the training corpus, so
# they are merged last and get the highest ids.
RARE_WORDS = ["sks", "zwx", "qlo", "vyk", "xjr", "pqd", "kzv", "bnq", "wuf", "yxo", "jhv", "zqp", "fep", "dax", "lix", "mog", "nuv", "rox", "sib", "tep", "vod", "wex", "yun", "zor", "kav", "gip", "hux", "jol", "kem", "lun", "mip", "nog", "piv", "quz", "rad", "suf", "tiv", "uxo", "vep", "wib"]


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def learn_bpe(word_counts: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken
    lexicographically) until every word is one token. Returns (vocab, merges)."""
    alphabet = list(bytes_to_unicode().values())
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    words = {
        (*w[:-1], w[-1] + "</w>"): c for w, c in sorted(word_counts.items())
    }
    merges: list[str] = []
    while True:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for pieces, count in words.items():
            for a, b in itertools.pairwise(pieces):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        vocab_tokens.append(best[0] + best[1])
        merged = {}
        for pieces, count in words.items():
            out, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    vocab_tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_tokens)}, merges


@functools.cache
def tiny_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    counts = {w: 1000 - i for i, w in enumerate(dict.fromkeys(COMMON_WORDS))}
    counts.update({w: 1 for w in RARE_WORDS if w not in counts})
    vocab, merges = learn_bpe(counts)
    return vocab, tuple(merges)


def build_tiny_tokenizer(model_max_length: int = 77):
    """A ``CLIPTokenizer`` over the locally learned vocab (no files, no download)."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab_and_merges()
    # transformers 5: pass vocab=/merges= objects; the *_file arguments are silently ignored.
    tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges])
    tok.model_max_length = model_max_length
    return tok


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """Save the tiny tokenizer as a diffusers ``tokenizer/`` folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save_pretrained(folder)
    vocab, merges = tiny_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


@functools.cache
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    words = list(dict.fromkeys(COMMON_WORDS + RARE_WORDS))
    letters = sorted(set("".join(words)))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -i / 100) for i, w in enumerate(words)]
    pieces += [("▁", -50.0)] + [(c, -60.0) for c in letters]
    return tuple(pieces)


def build_tiny_t5_tokenizer(model_max_length: int = 512):
    """A ``T5TokenizerFast`` (SentencePiece-style unigram, ``</s>`` appended) over the same
    word list, built with the ``tokenizers`` library: no files, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tk = Tokenizer(models.Unigram(list(_t5_pieces()), unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    tok.model_max_length = model_max_length
    assert len(tok) == len(_t5_pieces()), "the T5 tokenizer lost its vocabulary"
    return tok


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen3's chat template reduced to what a text-to-image pipeline sends: user turns and the
# assistant prompt (Z-Image encodes "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n").
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen_tokenizer(model_max_length: int = 512):
    """A ``Qwen2TokenizerFast`` (byte-level BPE, Qwen's special tokens and chat template) over the
    same word list, its merges learned by the ``tokenizers`` trainer until every word is one token
    (the rare words, seen once, are merged last): no files, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tk.decoder = decoders.ByteLevel()
    counts = {w: 1000 - i for i, w in enumerate(dict.fromkeys([*COMMON_WORDS, "user", "assistant"]))}
    counts.update({w: 1 for w in RARE_WORDS if w not in counts})
    corpus = [w for w, c in counts.items() for _ in range(min(c, 50))]
    trainer = trainers.BpeTrainer(vocab_size=100_000, special_tokens=list(QWEN_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer=trainer)
    tok = Qwen2TokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             unk_token=None, bos_token=None)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    # Through disk and back: the Qwen2 tokenizer class rebuilds its own pre-tokenizer (Qwen's
    # split regex, no prefix space) on load, so the in-memory tokenizer must be that one too,
    # or a base saved with save_pretrained would tokenize differently from the one it was.
    with tempfile.TemporaryDirectory() as folder:
        tok.save_pretrained(folder)
        tok = Qwen2TokenizerFast.from_pretrained(folder)
    tok.model_max_length = model_max_length
    assert len(tok) == tk.get_vocab_size(), "the Qwen tokenizer lost its vocabulary"
    return tok
