"""The DreamBooth rare-token identifier ``[V]``.

The paper (Ruiz et al., 2023, sec. 3.2) picks identifiers by looking up *rare tokens* in
the vocabulary: tokens that are a whole word of at most 3 characters, that the tokenizer
maps back to exactly one token, and that sit in the rarely used part of the vocabulary, so
the model has a weak prior for them. Random strings of letters are worse: they split into
several common pieces ("xxy5syt00" -> "xx", "y", "5", ...), each with a strong prior.

For BPE vocabularies such as CLIP's, later merges are rarer, so "rare" means a merge in the
last part of the merge list (CLIP's "sks", the community's usual choice, is merge 47,6xx of
48,894). The 512 byte-level alphabet tokens at the start of the vocab are not merges.
"""

from __future__ import annotations

import hashlib
import re

from dreamfleet.core.errors import ConfigError

_CANDIDATE = re.compile(r"^[a-z]{2,3}$")
RARE_BAND = (0.9, 1.0)  # fraction of the merge list considered rare
ALPHABET_SIZE = 512  # byte-level BPE: 256 bytes, each with and without </w>


def token_ids(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without the start/end tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _whole_word(token: str, clip_style: bool) -> str | None:
    """The word a whole-word token stands for: CLIP marks a word's end (``sks</w>``), byte-level
    BPE as in GPT-2 and Qwen marks the space before it (``Ġsks``)."""
    if clip_style:
        return token.removesuffix("</w>") if token.endswith("</w>") else None
    return token.removeprefix("Ġ") if token.startswith("Ġ") else None


def rare_token_candidates(tokenizer, band: tuple[float, float] = RARE_BAND) -> list[str]:
    """Whole-word tokens of 2-3 ASCII letters in the rare band that round-trip to one token."""
    vocab = tokenizer.get_vocab()
    clip_style = any(tok.endswith("</w>") for tok in vocab)
    alphabet = ALPHABET_SIZE if clip_style else ALPHABET_SIZE // 2  # byte-level: 256 bytes
    n_merges = len(vocab) - alphabet - len(tokenizer.all_special_tokens)
    lo = alphabet + int(band[0] * n_merges)
    hi = alphabet + int(band[1] * n_merges)
    out = []
    for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        word = _whole_word(tok, clip_style) if lo <= idx < hi else None
        if word and _CANDIDATE.match(word) and len(token_ids(tokenizer, f"a {word} dog")) == 3:
            out.append(word)
    return out


def choose_identifier(tokenizer, key: str = "", *, exclude: set[str] | frozenset[str] = frozenset()) -> str:
    """Pick a rare single-token identifier; ``key`` (e.g. the subject id) selects among the
    candidates deterministically, so different subjects get different identifiers."""
    candidates = [c for c in rare_token_candidates(tokenizer) if c not in exclude]
    if not candidates:
        raise ConfigError(
            "the tokenizer has no rare single-token identifier candidates; pass --identifier explicitly"
        )
    if not key:
        return candidates[0]
    digest = int(hashlib.sha256(key.encode()).hexdigest(), 16)
    return candidates[digest % len(candidates)]


def check_identifier(tokenizer, identifier: str) -> str:
    """Refuse an identifier that is empty, has spaces, or that the tokenizer splits."""
    if not identifier or not identifier.strip():
        raise ConfigError("identifier is empty; omit it to have a rare token chosen automatically")
    if identifier != identifier.strip() or " " in identifier:
        raise ConfigError(f"identifier {identifier!r} contains spaces; it must be a single word")
    # As it appears in a prompt, after a space (byte-level BPE, e.g. Qwen's, merges " sks", not "sks").
    ids = token_ids(tokenizer, f"a {identifier}")[len(token_ids(tokenizer, "a")):]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(
            f"identifier {identifier!r} splits into {len(ids)} tokens {pieces} in this tokenizer; "
            "pick a single-token identifier (a rare word of 2-3 letters), or omit --identifier to "
            "have one chosen from the tokenizer's rare tokens"
        )
    return identifier


def check_class_noun(class_noun: str, *, subject: str = "") -> str:
    where = f"subject {subject!r}: " if subject else ""
    if not isinstance(class_noun, str) or not class_noun.strip():
        raise ConfigError(f"{where}class noun is empty; pass the subject's class, e.g. --class-noun dog")
    return " ".join(class_noun.split())


def fill_prompt(template: str, identifier: str, class_noun: str) -> str:
    """A prompt template with ``{identifier}``/``{class_noun}`` or DreamBench's ``{0}``/``{1}``
    filled in, spaces collapsed (an empty identifier leaves no double space)."""
    text = template.format(identifier, class_noun, identifier=identifier, class_noun=class_noun)
    return " ".join(text.split())
