"""Text <-> token ids for Llama-family models.

One `Tokenizer` class over three sources: a Hugging Face `tokenizer.json` (run by the `tokenizers`
package), a sentencepiece `tokenizer.model` (run by `sentencepiece`), and the vocabulary embedded in a
GGUF file (rebuilt as a `tokenizers.Tokenizer` the way llama.cpp tokenizes it). `load_tokenizer` picks
the source; `StreamDecoder` turns generated ids into printable text deltas.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from .errors import InputError, ModelLoadError
from .gguf_file import GGUFFile, read_gguf_metadata

__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer"]

# Markers that close a turn in common chat formats. A model that declares another EOS still emits
# these when its chat template uses them, so generation must stop on them too.
_TURN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
# End-of-document markers: stopping on them is always right, whatever the template says.
_DOCUMENT_END_MARKERS = ("<|endoftext|>", "<|end_of_text|>")
# Chat markers that are one control token in their model's own tokenizer: a GGUF that types them NORMAL is read as if
# it said CONTROL. Google's QAT Gemma 3 GGUFs type <start_of_turn> and <end_of_turn> NORMAL, so the chat template's
# markers were cut into pieces and a reply never ended at <end_of_turn>; llama.cpp retypes such end-of-turn markers
# as control tokens too ("control-looking token ... its type will be overridden").
_GGUF_CONTROL_MARKERS = _TURN_END_MARKERS + ("<start_of_turn>",)
# Tokenizer.showing: {id(tokenizer): the special ids its skipping decode keeps} in this context (a thread's own)
_SHOWN: ContextVar[dict | None] = ContextVar("amphista_shown_specials", default=None)

# GGUF token_type values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SPIECE_SPACE = "\u2581"


class Tokenizer:
    """Encode/decode text for one model, plus the special ids generation needs.

    Build it with `load_tokenizer`. `encode` never adds EOS; it adds BOS when asked (or when the model
    wants it, for `add_bos=None`) but never doubles a BOS the text already starts with, so a chat
    template that writes `{{ bos_token }}` itself is safe to encode with the default.
    """

    def __init__(self, backend, *, bos_id=None, eos_ids=(), pad_id=None, unk_id=None,
                 add_bos=False, chat_template=None, source="", chat_templates=None):
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        self.special_ids: frozenset[int] = backend.special_ids
        self.bos_id: int | None = self._valid(bos_id)
        self.pad_id: int | None = self._valid(pad_id)
        self.unk_id: int | None = self._valid(unk_id)
        self.add_bos: bool = bool(add_bos) and self.bos_id is not None
        self.chat_template: str | None = chat_template or None
        # the model's named templates besides its default, e.g. {"tool_use": ...} (NousResearch's Hermes 2 Pro,
        # Cohere): chat.resolve_template takes "tool_use" for a prompt with tools, as transformers does
        self.chat_templates: dict[str, str] = {k: v for k, v in (chat_templates or {}).items()
                                               if isinstance(k, str) and isinstance(v, str) and v}
        self.source = str(source)
        self.eos_ids: list[int] = self._collect_eos(eos_ids)
        # Ids whose text the ids after them can still change (see _TokenizersBackend): streamed text waits.
        self.byte_run_ids: frozenset[int] = getattr(backend, "byte_run_ids", frozenset())
        # Rows of the model's embedding, set by load_model: a text whose ids go past it (tokens added to the
        # tokenizer but not to the checkpoint) is refused by `encode`. None: no model to check against.
        self.model_vocab_size: int | None = None

    def _valid(self, token_id) -> int | None:
        return int(token_id) if token_id is not None and 0 <= int(token_id) < self.vocab_size else None

    def _collect_eos(self, declared) -> list[int]:
        ids = [self._valid(i) for i in declared]
        template = self.chat_template or ""
        for marker in _TURN_END_MARKERS + _DOCUMENT_END_MARKERS:
            token_id = self.token_to_id(marker)
            if token_id in self.special_ids and (marker in template or marker in _DOCUMENT_END_MARKERS):
                ids.append(token_id)
        return list(dict.fromkeys(i for i in ids if i is not None))

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special-token strings in it (`<|im_start|>`, `<s>`) become their single id."""
        if not isinstance(text, str):
            raise InputError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:     # the backends raise a bare TypeError or their own error on these
            raise InputError(f"text is not valid Unicode: it holds U+{ord(text[e.start]):04X}, a lone surrogate "
                             f"(bytes that were not UTF-8, read with errors='surrogateescape'?)") from None
        ids = list(self._backend.encode(text))
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        limit = self.model_vocab_size
        if limit is not None and ids and max(ids) >= limit:
            bad = max(ids)
            raise InputError(f"the text encodes to token {bad} ({self.id_to_piece(bad)!r}), which the model's "
                             f"embedding ({limit} rows) does not have: the tokenizer ({self.source}) has tokens "
                             "the checkpoint was not resized for")
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Ids outside the vocabulary (padded embedding rows) decode to nothing. Within
        `showing(shown)`, skip_special_tokens leaves out the special tokens but those."""
        ids = [i for i in map(int, ids) if 0 <= i < self.vocab_size]
        shown = self.shown_ids() if skip_special_tokens else frozenset()
        if shown and not shown.isdisjoint(ids):
            # one decode of the ids less the skipped specials, as the skipping decode itself joins the text around
            # them (sentencepiece's spaces, a character's bytes): decoding the stretches between shown ones apart
            # would not
            return self._backend.decode([i for i in ids if i in shown or i not in self.special_ids], False)
        return self._backend.decode(ids, skip_special_tokens)

    @contextmanager
    def showing(self, ids: Iterable[int]):
        """Within the block (in this thread, or this context), decoding that skips special tokens keeps those of
        `ids` (a stream decoder's too, as generation decodes answers): a tool call parser reads the control tokens
        its format writes (Mistral's [TOOL_CALLS] and [ARGS], Llama 3.1's <|python_tag|>), which an answer's text
        otherwise leaves out. Ids that are not special are decoded anyway."""
        shown = frozenset(int(i) for i in ids) & self.special_ids
        token = _SHOWN.set({**(_SHOWN.get() or {}), id(self): shown})
        try:
            yield
        finally:
            _SHOWN.reset(token)

    def shown_ids(self) -> frozenset[int]:
        """The special ids a skipping decode keeps here and now (showing)."""
        shown = _SHOWN.get()
        return shown.get(id(self), frozenset()) if shown else frozenset()

    def stream_decoder(self, skip_special_tokens: bool = False, context: Iterable[int] = ()) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens, context)

    # -- vocabulary -----------------------------------------------------------------------------

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry for `token_id`, as stored (byte-level or `▁`-spelled)."""
        if not 0 <= int(token_id) < self.vocab_size:
            raise InputError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self._backend.id_to_piece(int(token_id)) or ""

    def token_to_id(self, piece: str) -> int | None:
        """The id of vocabulary entry `piece`, or None if there is none."""
        return self._backend.token_to_id(piece)

    @property
    def bos_token(self) -> str:
        return self.id_to_piece(self.bos_id) if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.id_to_piece(self.eos_ids[0]) if self.eos_ids else ""

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, backend={type(self._backend).__name__}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_ids={self.eos_ids})")


class StreamDecoder:
    """Incremental detokenizer: `push` ids as they are generated, print what it returns.

    Concatenating every `push` result and the final `flush()` gives exactly `decode(all ids)`. Text is
    held back while it ends in an incomplete UTF-8 character (U+FFFD), and each delta is computed
    by decoding a short window that starts at the previously emitted token(s), so sentencepiece's
    leading-space pieces (`▁word`, whose space the decoder drops at the start of a text) and
    byte-level pieces come out with the right spacing. With tokenizers' ByteFallback decoder (Llama 2 style
    tokenizer.json) a run of byte pieces is held until a piece that is not a byte ends it: a later invalid byte
    turns the whole run into U+FFFD there.

    context: the ids the pushed ones follow (a continued assistant message's last prompt tokens), read before them
    and never emitted: the deltas then join to decode(context + ids)[len(decode(context)):], as vLLM's detokenizer
    reads an answer after its prompt, so a `▁word` right after the context keeps its space. Without it they join
    to decode(ids), as transformers' decode of the new tokens gives them.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, context: Iterable[int] = ()):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = self._context([int(i) for i in context])
        self._start = len(self._ids)  # the pushed ids start here
        self._prefix = 0  # window start: the decoder sees this token's context again
        self._read = self._start  # everything before this has been emitted

    def push(self, token_ids: int | Iterable[int]) -> str:
        """Add one id or several (e.g. all tokens a speculative step accepted); return the new text."""
        try:
            self._ids.extend([int(i) for i in token_ids])
        except TypeError:  # a single id (int, numpy scalar, 0-d tensor)
            self._ids.append(int(token_ids))
        if self._in_byte_run():
            return ""
        prefix_text, new_text = self._window()
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Emit whatever was held back (an incomplete character at the very end decodes as U+FFFD). Pushing more
        after it goes on as before: the next piece is still read after the text before it."""
        prefix_text, new_text = self._window()
        text = new_text[len(prefix_text):]
        if text.endswith("\ufffd"):
            # the held bytes are final as U+FFFD: bytes pushed later start a text of their own, never completing them
            self._prefix = self._read = len(self._ids)
        elif text:
            self._prefix, self._read = self._read, len(self._ids)
        # Before, any flush restarted the window, one that emitted nothing too: a sentencepiece `▁word` pushed next
        # lost its space ("<s>" then "▁f" streamed "<s>f", decode gives "<s> f").
        return text

    @property
    def token_ids(self) -> list[int]:
        return self._ids[self._start:]

    @property
    def pending(self) -> str:
        """The text of the ids pushed but held back so far (an unfinished character or byte run), as it decodes
        now. The generation loop matches stop strings in it and places a skipped special token after it."""
        prefix_text, new_text = self._window()
        return new_text[len(prefix_text):]

    def _in_byte_run(self) -> bool:
        """Whether the last id that shows in the text is a byte piece whose run may still change (ids that
        decode to nothing, skipped specials and ids past the vocabulary, join the runs on both sides)."""
        tok = self._tokenizer
        if not tok.byte_run_ids:
            return False
        shown = tok.shown_ids() if self._skip else frozenset()
        for i in reversed(self._ids[self._read:]):
            if 0 <= i < tok.vocab_size and not (self._skip and i in tok.special_ids and i not in shown):
                return i in tok.byte_run_ids
        return False

    def _context(self, ids: list[int]) -> list[int]:
        """The context's last 4 to 23 ids, the fewest that decode to some text without U+FFFD (vLLM's choice, less
        its empty windows): enough to place the first pushed piece after text, and the window does not start inside
        a character. Each push decodes
        the context again until the first text comes out, so a long prompt is never read whole."""
        for n in range(4, min(len(ids), 23) + 1):
            # text, not just no U+FFFD: after ids that decode to nothing (skipped specials, padded rows) a `▁word`
            # read first lost its space, which decode(context + ids) keeps
            text = self._tokenizer.decode(ids[-n:], self._skip)
            if text and "\ufffd" not in text:
                return ids[-n:]
        return ids[-4:] if len(ids) > 23 else ids

    def _window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        before, text = (decode(self._ids[self._prefix:self._read], self._skip),
                        decode(self._ids[self._prefix:], self._skip))
        if self._prefix < self._start and not text.startswith(before):
            # tokenizers' ByteFallback read the context's closing byte pieces and the first pushed ones as one
            # run, invalid as a whole, and turned the context's characters into U+FFFD too: the pushed ids alone
            return "", decode(self._ids[self._start:], self._skip)
        return before, text


# -- backends -------------------------------------------------------------------------------------


class _ControlSplitter:
    """Cuts text at control-token strings (`<s>`, `</s>`) for sentencepiece vocabularies.

    sentencepiece never matches control pieces in text, and puts its dummy prefix space in front of
    whatever it encodes; so each stretch of text between control tokens is encoded on its own and
    gets that space, as in llama.cpp, Meta's reference Llama code and transformers' legacy Llama
    tokenizer. (User-defined pieces stay inside a stretch, as in sentencepiece.)

    rstrip: the tokens that take the whitespace after them, as a Hugging Face added token with that flag does
    (Phi-3's `<|end|>` and `<|assistant|>`: the chat template's "\\n" after them is no token); lstrip: those that
    take the whitespace before them. whitespace: what they take, as `str.lstrip`'s argument (None: what `str.isspace`
    calls whitespace, as transformers' Python tokenizers strip it). single_word: the tokens that count only between
    spaces (_single_word).
    """

    def __init__(self, pieces: dict[str, int], encode_stretch, rstrip=(), lstrip=(), whitespace=None,
                 single_word=()):
        ordered = sorted((p for p in pieces if p), key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        self.pieces = pieces
        self.encode_stretch = encode_stretch
        self.rstrip, self.lstrip = frozenset(rstrip), frozenset(lstrip)
        self.whitespace = whitespace
        self.single_word = frozenset(single_word)

    def __call__(self, text: str) -> list[int]:
        if self.pattern is None:
            return list(self.encode_stretch(text)) if text else []
        parts = self.pattern.split(text)   # re.split puts the captured separators at odd positions
        if self.single_word:
            return self._single_word([p for p in parts if p])
        for k in range(1, len(parts), 2):
            if parts[k] in self.rstrip:
                parts[k + 1] = parts[k + 1].lstrip(self.whitespace)
            if parts[k] in self.lstrip:
                parts[k - 1] = parts[k - 1].rstrip(self.whitespace)
        ids = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.pieces[part])
            elif part:
                ids.extend(self.encode_stretch(part))
        return ids

    def _single_word(self, parts: list[str]) -> list[int]:
        """A text with single_word tokens, cut as transformers' Python tokenizer (PreTrainedTokenizer.tokenize) cuts
        it: such a token counts only where the text before it ends in a space (or nothing is before it) and the text
        after it starts with one, else it joins its neighbour, before or else after, as text. Its steps are followed
        one by one, as a neighbour it joined may itself be a token whose flags then no longer act. Before, a
        fine-tune's single_word `<think>` was cut out of "re<think>ing" too, ids its model never saw."""
        for k, part in enumerate(parts):
            if part not in self.pieces:
                continue
            left = parts[k - 1] if k else None
            right = parts[k + 1] if k + 1 < len(parts) else None
            if part in self.rstrip and right:
                parts[k + 1] = right.lstrip(self.whitespace)
            if part in self.lstrip and left:
                parts[k - 1] = left.rstrip(self.whitespace)
            if part in self.single_word:
                if left and left[-1] != " ":
                    parts[k - 1] += part
                    parts[k] = ""
                elif right and right[0] != " ":
                    parts[k + 1] = part + parts[k + 1]
                    parts[k] = ""
        ids = []
        for part in parts:
            if part in self.pieces:
                ids.append(self.pieces[part])
            elif part:
                ids.extend(self.encode_stretch(part))
        return ids


# What a tokenizers added token's rstrip takes: Unicode White_Space, as tokenizers' char::is_whitespace (str.isspace
# also takes U+001C..U+001F).
_WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
                + "\u2028\u2029\u202f\u205f\u3000")


class _TokenizersBackend:
    """A `tokenizers.Tokenizer`: tokenizer.json files and GGUF vocabularies."""

    def __init__(self, tok):
        self.tok = tok
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        # Added tokens may reuse or extend model ids; the embedding needs the largest id + 1.
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        # tokenizers' ByteFallback decoder (Llama 2 / Mistral tokenizer.json) turns a whole run of byte pieces
        # into U+FFFDs once any of it is invalid UTF-8, valid characters before included: a run's text is not
        # final until a piece that is not a byte ends it. StreamDecoder holds such runs back.
        decoder = tok.decoder.__getstate__() if tok.decoder is not None else b""
        self.byte_run_ids: frozenset[int] = frozenset()
        if b'"ByteFallback"' in decoder:
            self.byte_run_ids = frozenset(i for p, i in vocab.items() if _byte_piece(p) is not None)

    def encode(self, text):
        # add_special_tokens=False: BOS is added by Tokenizer.encode, EOS never.
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special):
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_piece(self, token_id):
        return self.tok.id_to_token(token_id)

    def token_to_id(self, piece):
        return self.tok.token_to_id(piece)


# surrogateescape spells each byte of invalid UTF-8 as U+DC80..U+DCFF; sentencepiece shows each as U+FFFD.
_ESCAPED_BYTES = {0xDC00 + b: 0xFFFD for b in range(0x80, 0x100)}


class _PieceDecoder:
    """Text of sentencepiece ids, decoded as the `sentencepiece` library does (checked against it on random ids).

    Byte pieces (`<0xE2>`) are joined into UTF-8, each byte that is not part of a valid character becoming one
    U+FFFD (Python's 'replace' gives one per invalid run; tokenizers' ByteFallback turns a whole run of byte
    pieces into U+FFFDs when any of it is invalid, valid characters included, so text already streamed would
    change as later bytes arrive). The dummy-prefix space comes off the first piece only, and only where that
    piece is text starting with `▁` (not a byte `<0x20>`). Control pieces are kept as text unless skipped.
    """

    def __init__(self, pieces: list[str], special_ids, byte_values: dict[int, int], dummy_prefix: bool):
        self.pieces, self.special_ids, self.bytes, self.dummy_prefix = pieces, special_ids, byte_values, dummy_prefix

    def __call__(self, ids, skip_special) -> str:
        out, buf, first = [], bytearray(), True
        for i in ids:
            if i in self.special_ids:
                if not skip_special:
                    out += [_utf8(buf), self.pieces[i]]
                    buf.clear()
                    first = False
                continue
            if i in self.bytes:
                buf.append(self.bytes[i])
            else:
                text = self.pieces[i].replace(_SPIECE_SPACE, " ")
                buf += (text[1:] if first and self.dummy_prefix and text.startswith(" ") else text).encode()
            first = False
        return "".join(out) + _utf8(buf)


def _utf8(data: bytearray) -> str:
    return data.decode("utf-8", "surrogateescape").translate(_ESCAPED_BYTES)


def _byte_piece(piece: str) -> int | None:
    """The byte a sentencepiece byte-fallback piece (`<0x0A>`) stands for."""
    return int(piece[3:5], 16) if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) else None


class _SentencePieceBackend:
    """A sentencepiece `tokenizer.model`, run by the `sentencepiece` library itself.

    Decoding is done here from the pieces, because `sp.decode` silently drops control tokens, which
    hides them when the caller asked to keep special tokens.
    """

    def __init__(self, sp, added: dict[int, _AddedToken] | None = None):
        """added: the tokens transformers adds on top of the model (_declared_added_tokens): matched whole in text,
        as transformers matches them, taking the whitespace their rstrip/lstrip flags say, and ids past the model's
        pieces."""
        self.sp = sp
        n = sp.get_piece_size()
        added = added or {}
        self.pieces = [sp.id_to_piece(i) for i in range(n)] + [""] * max(0, max(added, default=-1) + 1 - n)
        self.vocab_size = len(self.pieces)
        special = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        for i, a in added.items():
            self.pieces[i] = a.text
            (special.add if a.special else special.discard)(i)
        self.special_ids = frozenset(special)
        byte_values = {i: int(self.pieces[i][3:-1], 16) for i in range(n) if sp.is_byte(i) and i not in added}
        self.ids = {}
        for i, p in enumerate(self.pieces):
            self.ids.setdefault(p, i)
        self.ids.update({a.text: i for i, a in added.items()})
        # Before, a fine-tune's `<|end|>` declared rstrip (Phi-3 style chat tokens) left the template's "\n" after
        # it as tokens of its own, where transformers' tokenizer, which the model was trained with, drops it.
        self.encode = _ControlSplitter({**{self.pieces[i]: i for i in self.special_ids},
                                        **{a.text: i for i, a in added.items()}}, sp.encode,
                                       rstrip={a.text for a in added.values() if a.rstrip},
                                       lstrip={a.text for a in added.values() if a.lstrip},
                                       single_word={a.text for a in added.values() if a.single_word})
        probe = sp.encode("a", out_type=str)
        # sentencepiece drops the space it put in front of the text when encoding.
        self.decode = _PieceDecoder(self.pieces, self.special_ids, byte_values,
                                    bool(probe) and probe[0].startswith(_SPIECE_SPACE))

    def id_to_piece(self, token_id):
        return self.pieces[token_id]

    def token_to_id(self, piece):
        return self.ids.get(piece)


# -- GGUF vocabularies ----------------------------------------------------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Mistral's Tekken (Mistral Nemo, Mistral Small 3, Pixtral's text model): the regex of its tokenizer.json, which
# llama.cpp rewrites with lookaheads for its own regex engine (Oniguruma takes the \p{Lu}/\p{Ll} classes as written).
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek Coder 1.3B-33B (Llama architecture): newlines, letter runs, punctuation runs, CJK runs, then each digit.
_DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
                          r"\p{N}")
# GPT-4o's o200k regex, as Phi-4-mini's tokenizer.json (a conversion of tiktoken's o200k_base) writes it; llama.cpp
# rewrites it with lookaheads for its regex engine, as it does Tekken's, which cuts a word after a non-ASCII capital.
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5's tokenizer.json regex (llama.cpp spells its (?i:...) out): Qwen2's, with combining marks kept in words.
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek V3 / R1: digit groups of up to three, Han and kana runs, then the rest; llama.cpp's three regexes are
# those of DeepSeek-V3's tokenizer.json.
_DEEPSEEK_V3_SPLITS = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                       r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                       r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek LLM 7B/67B: llama.cpp's regexes, their characters written as escapes (a range ends at U+1F7D, another
# starts at the Kelvin sign U+212A: Unicode normalization of the text turns those into other letters, and the second
# range into K..U+212D, thousands of characters wider). The last step splits each digit off, as the
# `Digits(individual_digits)` of DeepSeek's tokenizer.json does (llama.cpp writes \p{N}+: the same ids while no
# token of the vocabulary joins digits).
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
    "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
_DEEPSEEK_LLM_SPLITS = ("[\r\n]", r"\s?[" + _DEEPSEEK_LLM_LETTERS + "]+",
                        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", r"\s+$",
                        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}")
# llama.cpp's LLAMA3 pre-tokenizer type: these names all split as Llama 3, look a whole pre-token up in the vocabulary
# before merging (its tokenizer.json's `ignore_merges`) and add BOS when the GGUF does not say. Falcon 3 and Pixtral
# merged where llama.cpp looks up, and Pixtral went without the BOS its model was trained with.
_LLAMA3_NAMES = ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")

# tokenizer.ggml.pre -> (regexes applied in turn, isolating each match). Names and regexes follow
# llama.cpp's llama-vocab.cpp, but for "default" (also no `pre` key, old conversions): that uses the GPT-2 regex, as
# transformers' GGUF converter does, since those vocabularies were learned with it. llama.cpp's DEFAULT type is not
# GPT-2's split but its switch's fallback: punctuation runs, GPT-2's regex, digit runs, then digits in threes.
_PRE_SPLITS = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "gigachat", "a.x-4.0", "mellum",
                     "exaone4", "trillion"), (_GPT2_SPLIT,)),
    # StarCoder-style: every digit on its own, then GPT-2. ("minerva" was never a llama.cpp name: its converter
    # writes "minerva-7b", which was refused.)
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva", "minerva-7b"),
                    (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys(_LLAMA3_NAMES + ("dbrx", "smaug-bpe"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), (_QWEN2_SPLIT,)),
    "tekken": (_TEKKEN_SPLIT,),
    "deepseek-coder": _DEEPSEEK_CODER_SPLITS,
    # llama.cpp's GPT4O type (Phi-4-mini, Llama 4, and its kanana2, talkie), DEEPSEEK_LLM, DEEPSEEK3_LLM and QWEN35:
    # none looks whole pre-tokens up before merging or adds BOS when the GGUF does not say. A Llama 4 GGUF was refused
    # for its `llama4` name, though its vocabulary splits as o200k does (as transformers' GGUF converter reads it too).
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie"), (_GPT4O_SPLIT,)),
    "deepseek-llm": _DEEPSEEK_LLM_SPLITS,
    "deepseek-v3": _DEEPSEEK_V3_SPLITS,
    "qwen35": (_QWEN35_SPLIT,),
}
# llama.cpp matches a whole pre-token against the vocabulary before merging for Llama 3 and Tekken (as their
# tokenizer.json's `ignore_merges` does).
_IGNORE_MERGES = {*_LLAMA3_NAMES, "tekken"}
# Vocabularies whose tokenizer adds BOS when the GGUF does not say (llama.cpp's defaults).
_BOS_BY_DEFAULT = {*_LLAMA3_NAMES, "tekken"}
# Vocabularies whose tokenizer.json normalizes text to NFC before splitting (Qwen2/2.5/3's `"normalizer": NFC`, and
# Qwen3.5's, as transformers' Qwen3_5Tokenizer builds it). llama.cpp leaves this out, but the model was trained on NFC
# text: a decomposed "e" + U+0301 (macOS file names, text pasted from some PDFs) must encode as the precomposed "é"
# the Hugging Face tokenizer gives.
_NFC = {"qwen2", "qwen35"}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _added_tokens(tokens, types, user_defined_normalized=False):
    """CONTROL/UNKNOWN tokens become special added tokens and USER_DEFINED plain added ones: both
    are matched whole in the text, never cut into pieces."""
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN) and t]
    plain = [AddedToken(t, special=False, normalized=user_defined_normalized)
             for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t]
    return special, plain


def _gguf_byte_level(tokens, types, merges, pre, where):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

    if pre not in _PRE_SPLITS:
        raise ModelLoadError(f"{where}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                             f"supported: {', '.join(sorted(_PRE_SPLITS))}; load the model's Hugging Face folder "
                             "(its tokenizer.json) instead")
    if not merges:
        raise ModelLoadError(f"{where}: GGUF byte-level BPE vocabulary has no merges (tokenizer.ggml.merges)")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        # Normal tokens must be byte-level spelled; a few converters stored some as raw text.
        if ty == _NORMAL and not set(t) <= alphabet:
            t = "".join(spelling[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _NFC:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special, plain = _added_tokens(tokens, types)
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    backend = _TokenizersBackend(tok)
    backend.decode = _AddedAsText(tok, tokens, types)
    return backend


class _AddedAsText:
    """Decoding of a GGUF byte-level vocabulary: control and user-defined tokens are their text as it stands
    (llama.cpp's converter stores them decoded and llama.cpp prints them so), ordinary tokens byte-level.
    tokenizers' ByteLevel decoder reads any token whose characters all lie in its byte alphabet as bytes, so a
    user-defined `naïve` came out as `na\ufffdve`. Runs of ordinary tokens still go to tokenizers: an added
    token is valid UTF-8, so splitting the bytes around it changes no replacement character."""

    def __init__(self, tok, tokens, types):
        self.tok = tok
        self.added = {i: t for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (_CONTROL, _UNKNOWN, _USER_DEFINED)}
        self.skippable = frozenset(i for i, ty in enumerate(types) if ty in (_CONTROL, _UNKNOWN))
        # UNUSED: the rows llama.cpp's converter pads the vocabulary with ([PAD151643].. in Qwen files), which
        # llama.cpp prints as nothing, as a Hugging Face tokenizer prints ids past its vocabulary: their names
        # came out as answer text ("[PAD371]") where the model's folder gave none.
        self.unused = frozenset(i for i, ty in enumerate(types) if ty == _UNUSED)

    def __call__(self, ids, skip_special) -> str:
        parts, run = [], []
        for i in ids:
            # A skipped special prints nothing, so the bytes on its two sides join (as in Hugging Face's decode and
            # llama.cpp's): cutting the run there turned a character split around it into two U+FFFDs.
            if i in self.unused or (skip_special and i in self.skippable):
                continue
            if i not in self.added:
                run.append(i)
                continue
            if run:
                parts.append(self.tok.decode(run))
                run = []
            parts.append(self.added[i])
        return "".join(parts) + (self.tok.decode(run) if run else "")


def _gguf_sentencepiece(tokens, types, scores, unk_id, add_space_prefix, rstrip=()):
    """A sentencepiece BPE vocabulary as a `tokenizers` BPE: sentencepiece merges the adjacent pair
    whose joined piece scores highest, so ranking every split of every piece by that score gives
    the same merges (the same construction transformers uses). rstrip: the control tokens that take the
    whitespace after them (_ControlSplitter)."""
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers

    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    normal = {t for t, ty in zip(tokens, types) if ty == _NORMAL}
    ranked = sorted(
        (-score, i, t[:k], t[k:])
        for i, (t, ty, score) in enumerate(zip(tokens, types, scores)) if ty == _NORMAL
        for k in range(1, len(t)) if t[:k] in normal and t[k:] in normal)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = HFTokenizer(models.BPE(vocab, [(a, b) for _, _, a, b in ranked], unk_token=unk, fuse_unk=True,
                                 byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", _SPIECE_SPACE)
    # User-defined pieces are matched in normalized text, like sentencepiece does (llama.cpp's
    # converter stored their `▁` as real spaces, which the normalizer turns back).
    special, plain = _added_tokens(tokens, types, user_defined_normalized=True)
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    backend = _TokenizersBackend(tok)
    # Any `<0xXX>` piece, as the BPE's byte fallback encodes with (some converters leave them typed NORMAL).
    byte_values = {i: b for i, t in enumerate(tokens) if (b := _byte_piece(t)) is not None}
    backend.decode = _PieceDecoder(list(tokens), backend.special_ids, byte_values, bool(add_space_prefix))
    prefix = _SPIECE_SPACE if add_space_prefix else ""
    backend.encode = _ControlSplitter({t.content: vocab[t.content] for t in special},
                                      lambda text: tok.encode(prefix + text, add_special_tokens=False).ids,
                                      rstrip=rstrip, whitespace=_WHITE_SPACE)
    return backend


def _phi3_rstrip(meta, tokens, types) -> frozenset[str]:
    """The tokens of a Phi-3 sentencepiece vocabulary that take the whitespace after them. A GGUF does not store
    added tokens' flags; Phi-3's tokenizer.json marks its chat tokens and `</s>` rstrip, so the template's
    `<|user|>\\n` is one token, and llama.cpp sets the same for a model whose name says Phi-3 ("phi-3", "phi3"; here
    too for the phi3 architecture, whose newer conversions are named "Phi 3 Mini ..."). Without them every turn
    marker of a Phi-3 GGUF prompt was followed by `▁` and `<0x0A>` tokens its model never saw there."""
    name = str(meta.get("general.name") or "").lower()
    if meta.get("general.architecture") != "phi3" and "phi-3" not in name and "phi3" not in name:
        return frozenset()
    return frozenset(t for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)
                     and t not in ("<unk>", "<s>", "<|endoftext|>"))


def _load_gguf(source) -> Tokenizer:
    if isinstance(source, GGUFFile):
        where, meta = source.path, source.meta
    elif hasattr(source, "fields"):  # an open gguf.GGUFReader
        where = str(getattr(getattr(source, "data", None), "filename", None) or "GGUF reader")
        meta = {k: f.contents() for k, f in source.fields.items() if k.startswith(("tokenizer.", "general."))}
    else:
        where = str(source)
        meta = read_gguf_metadata(where)
    get = meta.get

    kind = get("tokenizer.ggml.model")
    if kind is None:
        raise ModelLoadError(f"{where}: GGUF file has no embedded tokenizer (no tokenizer.ggml.model)")
    tokens = get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{where}: GGUF file has no vocabulary (tokenizer.ggml.tokens)")
    types = get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    unk_id = get("tokenizer.ggml.unknown_token_id")
    pre = get("tokenizer.ggml.pre") or "default"
    if kind == "gpt2" and not get("tokenizer.ggml.pre"):
        # llama.cpp too falls back with a warning: files converted before the key existed (early Llama 3 GGUFs) split
        # text otherwise than their model's tokenizer did (digits, contractions, newlines), which no error shows.
        warnings.warn(f"{where}: the GGUF does not say how its byte-level BPE splits text (no tokenizer.ggml.pre); "
                      "splitting as GPT-2 does ('default'). For a Llama 3, Qwen or SmolLM model the prompt ids then "
                      "differ from its own tokenizer's: reconvert the file with a current llama.cpp, or load the "
                      "model's Hugging Face folder", stacklevel=3)
    # Without scores, file order is merge order (sentencepiece writes pieces best-first).
    scores = get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    for key, values in (("token_type", types), ("scores", scores)):
        if len(values) != len(tokens):
            raise ModelLoadError(f"{where}: GGUF tokenizer.ggml.{key} has {len(values)} entries for "
                                 f"{len(tokens)} tokens (tokenizer.ggml.tokens)")
    types = [_CONTROL if ty == _NORMAL and t in _GGUF_CONTROL_MARKERS else ty for t, ty in zip(tokens, types)]
    if kind not in ("gpt2", "llama"):
        raise ModelLoadError(f"{where}: GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; "
                             "supported: 'gpt2' (byte-level BPE), 'llama' (sentencepiece)")
    try:
        if kind == "gpt2":
            backend = _gguf_byte_level(tokens, types, get("tokenizer.ggml.merges"), pre, where)
            add_bos_default = pre in _BOS_BY_DEFAULT
        else:
            if unk_id is None:
                unk_id = next((i for i, ty in enumerate(types) if ty == _UNKNOWN), None)
            backend = _gguf_sentencepiece(tokens, types, scores, unk_id, get("tokenizer.ggml.add_space_prefix", True),
                                          _phi3_rstrip(meta, tokens, types))
            add_bos_default = True
    except ModelLoadError:
        raise
    except Exception as e:  # tokenizers raises bare Exception (a merge of tokens the vocabulary lacks)
        raise ModelLoadError(f"{where}: cannot build the GGUF's embedded {kind!r} tokenizer ({e})") from e
    eos = [get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return Tokenizer(backend, bos_id=get("tokenizer.ggml.bos_token_id"), eos_ids=[i for i in eos if i is not None],
                     pad_id=get("tokenizer.ggml.padding_token_id"), unk_id=unk_id,
                     add_bos=get("tokenizer.ggml.add_bos_token", add_bos_default),
                     chat_template=get("tokenizer.chat_template"), source=where,
                     # llama.cpp's converter writes a file's named templates as tokenizer.chat_template.NAME
                     chat_templates={n: get(f"tokenizer.chat_template.{n}")
                                     for n in (get("tokenizer.chat_templates") or ()) if isinstance(n, str)})


# -- tokenizer.json / tokenizer.model directories -------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:      # RecursionError: arrays nested thousands deep
        raise ModelLoadError(f"{path}: not valid JSON ({str(e) or type(e).__name__})") from None
    return data if isinstance(data, dict) else {}


def _dir_config(folder: Path) -> dict[str, Any]:
    """Special tokens, BOS policy and chat template from the JSON files beside a tokenizer."""
    cfg = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    generation = _read_json(folder / "generation_config.json")

    def token(name):
        value = cfg[name] if name in cfg else special_map.get(name)
        return value.get("content") if isinstance(value, dict) else value

    template, named = cfg.get("chat_template"), {}
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):  # as transformers holds them (a config written by hand)
        named = template
        template = template.get("default", next(iter(template.values()), None))
    extra = folder / "additional_chat_templates"     # where transformers >= 4.54 saves the named ones
    if extra.is_dir():
        for f in sorted(extra.glob("*.jinja")):
            try:
                named[f.stem] = f.read_text(encoding="utf-8")
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"{f}: cannot read as UTF-8 text ({e})") from e
    if (folder / "chat_template.jinja").is_file():
        # transformers reads this file over the config's template ("Clobbers any template in the config"): a folder
        # whose template was fixed in chat_template.jinja, the config keeping the old one, chatted in the old one
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8") or template
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{folder / 'chat_template.jinja'}: cannot read as UTF-8 text ({e})") from e
    if not template:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    gen_eos = generation.get("eos_token_id")
    return {
        "bos": token("bos_token"), "eos": token("eos_token"), "pad": token("pad_token"), "unk": token("unk_token"),
        "add_bos": cfg.get("add_bos_token"), "template": template if isinstance(template, str) else None,
        "templates": {k: v for k, v in named.items() if k != "default"},
        "gen_eos": gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [],
        "gen_bos": generation.get("bos_token_id"), "gen_pad": generation.get("pad_token_id"),
    }


def _token_id(backend, text, *fallbacks):
    """Id of a configured token string, else the first known fallback id."""
    found = backend.token_to_id(text) if isinstance(text, str) else None
    return next((i for i in (found, *fallbacks) if i is not None), None)


def _from_dir_config(backend, cfg, source, *, bos=None, eos=None, pad=None, unk=None, add_bos=None) -> Tokenizer:
    add = cfg["add_bos"] if cfg["add_bos"] is not None else add_bos
    eos_ids = [_token_id(backend, cfg["eos"], eos), *cfg["gen_eos"]]
    return Tokenizer(backend, bos_id=_token_id(backend, cfg["bos"], cfg["gen_bos"], bos),
                     eos_ids=[i for i in eos_ids if i is not None],
                     pad_id=_token_id(backend, cfg["pad"], cfg["gen_pad"], pad),
                     unk_id=_token_id(backend, cfg["unk"], unk),
                     add_bos=add, chat_template=cfg["template"], source=source, chat_templates=cfg["templates"])


def _load_tokenizer_json(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exception on malformed files
        raise ModelLoadError(f"{path}: cannot load as a Hugging Face tokenizer.json ({e})") from e
    backend = _TokenizersBackend(tok)
    cfg = _dir_config(path.parent)
    bos_id = _token_id(backend, cfg["bos"], cfg["gen_bos"])
    # No add_bos_token in the config: the tokenizer.json post-processor decides (Llama 3 adds BOS there).
    with_specials, plain = (tok.encode("a", add_special_tokens=flag).ids[:1] for flag in (True, False))
    if bos_id is None and with_specials and with_specials != plain and with_specials[0] in backend.special_ids:
        # No bos_token configured (a tokenizer.json alone, or no tokenizer_config.json beside it), but the
        # post-processor puts a special token first: transformers adds it, so the model was trained with it.
        bos_id = with_specials[0]
    adds_bos = bos_id is not None and with_specials == [bos_id] != plain
    model_unk = getattr(tok.model, "unk_token", None)
    return _from_dir_config(backend, cfg, path, add_bos=adds_bos, bos=bos_id,
                            unk=backend.token_to_id(model_unk) if isinstance(model_unk, str) else None)


class _AddedToken(NamedTuple):
    text: str
    special: bool
    rstrip: bool = False
    lstrip: bool = False
    single_word: bool = False


def _declared_added_tokens(folder: Path, n_pieces: int) -> dict[int, _AddedToken]:
    """id -> (text, special, rstrip, lstrip, single_word) of the tokens a tokenizer.model folder adds beyond
    sentencepiece's pieces, as transformers reads them: tokenizer_config.json's added_tokens_decoder, then the legacy
    added_tokens.json (special where special_tokens_map.json or the config names it; no strip flags). Without them
    a fine-tune's `<|im_start|>` and `<|im_end|>` (ids past the base vocabulary; OpenHermes-style Mistral and Llama 2
    chat fine-tunes) were cut into pieces and its eos_token fell back to `</s>`: chats that never ended at the turn
    marker the model emits."""
    file = folder / "tokenizer_config.json"
    cfg = _read_json(file)
    decoder = cfg.get("added_tokens_decoder") or {}
    out: dict[int, _AddedToken] = {}
    if isinstance(decoder, dict):
        for key, tok in decoder.items():
            text = tok.get("content") if isinstance(tok, dict) else tok
            if not str(key).isdigit() or not isinstance(text, str) or not text:
                raise ModelLoadError(f"{file}: added_tokens_decoder entry {key!r}: {tok!r:.80} is not an id with a "
                                     "token's content")
            flags = tok if isinstance(tok, dict) else {"special": True}
            out[int(key)] = _AddedToken(text, bool(flags.get("special", False)), bool(flags.get("rstrip", False)),
                                        bool(flags.get("lstrip", False)), bool(flags.get("single_word", False)))
    special_map = _read_json(folder / "special_tokens_map.json")
    named = [cfg.get(k, special_map.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    named += [*(cfg.get("additional_special_tokens") or []), *(special_map.get("additional_special_tokens") or [])]
    specials = {t.get("content") if isinstance(t, dict) else t for t in named}
    legacy = folder / "added_tokens.json"
    for text, i in _read_json(legacy).items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0 or not text:
            raise ModelLoadError(f"{legacy}: {text!r:.40} -> {i!r}: expected token text -> a non-negative id")
        out.setdefault(i, _AddedToken(text, text in specials))
    far = [i for i in out if i >= n_pieces + (1 << 20)]
    if far:
        raise ModelLoadError(f"{folder}: added token id {far[0]} is far past the {n_pieces} pieces of tokenizer.model")
    return out


def _load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: cannot load as a sentencepiece model ({e})") from e
    backend = _SentencePieceBackend(sp, _declared_added_tokens(path.parent, sp.get_piece_size()))

    def known(i):
        return i if i >= 0 else None

    return _from_dir_config(backend, _dir_config(path.parent), path, bos=known(sp.bos_id()), eos=known(sp.eos_id()),
                            pad=known(sp.pad_id()), unk=known(sp.unk_id()), add_bos=True)


def load_tokenizer(source) -> Tokenizer:
    """Load a tokenizer from a model directory (tokenizer.json preferred, else tokenizer.model, else
    its only .gguf), a tokenizer.json / tokenizer.model / .gguf file, a read `gguf_file.GGUFFile` or an open
    `gguf.GGUFReader`."""
    if isinstance(source, GGUFFile) or (hasattr(source, "fields") and hasattr(source, "tensors")):
        return _load_gguf(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ModelLoadError(f"cannot load a tokenizer from a {type(source).__name__}; pass a path, a GGUFFile "
                             "or a GGUFReader")
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"tokenizer source not found: {path}")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _load_tokenizer_json(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            return _load_sentencepiece(path / "tokenizer.model")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0])
        hint = f"; it has {len(ggufs)} .gguf files, pass one of them" if ggufs else ""
        raise ModelLoadError(f"{path}: no tokenizer.json or tokenizer.model in this directory{hint}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(path)
    if path.suffix == ".json":
        return _load_tokenizer_json(path)
    if path.suffix == ".model":
        return _load_sentencepiece(path)
    raise ModelLoadError(f"{path}: not a tokenizer file (expected tokenizer.json, tokenizer.model or .gguf)")
