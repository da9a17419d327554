"""Reasoning parsing, as vLLM's --reasoning-parser: a thinking model's answer split into its reasoning (the text in
its `<think> ... </think>` block) and its content (the rest), streamed or whole.

qwen3 (Qwen3, SmolLM3): the answer has reasoning only where it opens with `<think>` (whitespace before it allowed);
with the template's enable_thinking false there is none. deepseek_r1 (DeepSeek-R1 and its distills, whose template
opens `<think>` in the prompt): everything before `</think>` is reasoning, an opening `<think>` written anyway left
out. Either way an answer cut before `</think>` is all reasoning, and text after it is all content (tags in it too).
The tags themselves are neither. ReasoningSplitter reads an answer piece by piece (a tag split across pieces waits for
the rest); split_reasoning reads it whole, and gives what the pieces give joined, however the text was cut.
"""
from __future__ import annotations

from .errors import InputError

__all__ = ["REASONING_PARSERS", "ReasoningSplitter", "check_reasoning_parser", "split_reasoning"]

THINK_START, THINK_END = "<think>", "</think>"
REASONING_PARSERS = ("qwen3", "deepseek_r1", "none")


def check_reasoning_parser(name) -> str | None:
    """A parser's name checked: "qwen3" or "deepseek_r1", or None for "none" (or None: no reasoning parsed)."""
    if name is None or name == "none":
        return None
    if name not in REASONING_PARSERS:
        raise InputError(f"reasoning parser must be one of {', '.join(REASONING_PARSERS)}, got {name!r}")
    return name


def _partial_end(text: str, tag: str) -> int:
    """How many of text's last characters are the beginning of tag (held back: the next piece may complete it)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    """An answer's text, fed piece by piece, as (reasoning, content) pieces; .reasoning and .content hold all of each
    given so far. parser: "qwen3", "deepseek_r1" or "none" (None: all content); thinking: the template's
    enable_thinking (False: qwen3 answers have no reasoning)."""

    def __init__(self, parser: str | None, thinking: bool = True):
        parser = check_reasoning_parser(parser)
        self.parser = parser
        self.text = ""          # all the text fed
        self.reasoning = ""
        self.content = ""
        self._held = ""         # fed, not yet given: a tag's beginning, or leading whitespace before a <think>
        self._skip = 0          # how many of _held's first characters are prime's prefill: never given
        # "open": whether the answer opens with <think> is not known yet; then "reasoning", then "content"
        self._state = "content" if parser is None or (parser == "qwen3" and not thinking) else "open"

    def prime(self, prefill: str) -> None:
        """Reads the start of the answer that is not the model's to give (an assistant prefill the model goes on
        from: continue_final_message): the splitter's state moves past it, but none of it is given as a piece, and
        .text / .reasoning / .content hold the rest only. Whitespace before a possible <think> is the prefill's; a
        tag's beginning at its end waits for the rest, as in feed."""
        self.feed(prefill)
        self.text = self.reasoning = self.content = ""
        if self._state == "open":
            self._held = self._held.lstrip()
        # what it holds back is the prefill's too ("<thi", "</th", a "<"): given out, it was the client's own text
        self._skip = len(self._held)

    def feed(self, piece: str) -> tuple[str, str]:
        """The (reasoning, content) this piece makes certain (either may be "")."""
        self.text += piece
        held, reasoning, content = self._held + piece, "", ""

        def take(n: int) -> str:
            """held's first n characters, consumed: those that are not the prefill's (prime)."""
            nonlocal held
            out, held = held[self._skip:n], held[n:]
            self._skip = max(0, self._skip - n)
            return out
        while held:
            if self._state == "open":
                head = held.lstrip()
                if head.startswith(THINK_START):
                    take(len(held) - len(head) + len(THINK_START))
                    self._state = "reasoning"
                    continue
                if THINK_START.startswith(head):        # whitespace, or a part of <think>: wait for more
                    break
                # no <think>: qwen3's answer is content; deepseek_r1's reasoning, its whitespace too
                self._state = "reasoning" if self.parser == "deepseek_r1" else "content"
            elif self._state == "reasoning":
                i = held.find(THINK_END)
                if i >= 0:
                    reasoning += take(i)
                    take(len(THINK_END))
                    self._state = "content"
                    continue
                reasoning += take(len(held) - _partial_end(held, THINK_END))
                break
            else:
                content += take(len(held))
        self._held = held
        self.reasoning += reasoning
        self.content += content
        return reasoning, content

    def end(self, text: str | None = None) -> tuple[str, str]:
        """The answer's end: (reasoning, content) not given yet. text: the whole answer, of which what was fed is the
        beginning (the rest is fed first). What was held back goes out as what it was read as: a partial tag in
        the reasoning stays reasoning (an answer cut before </think> is all reasoning); leading text that might
        have been <think> is qwen3's content, deepseek_r1's reasoning."""
        reasoning, content = "", ""
        if text is not None and len(text) > len(self.text) and text.startswith(self.text):
            reasoning, content = self.feed(text[len(self.text):])
        held, self._held = self._held[self._skip:], ""
        self._skip = 0
        if held:
            if self._state == "content" or self._state == "open" and self.parser == "qwen3":
                content += held
                self.content += held
            else:
                reasoning += held
                self.reasoning += held
        return reasoning, content


def split_reasoning(text: str, parser: str | None, thinking: bool = True) -> tuple[str | None, str | None]:
    """A whole answer's (reasoning, content), None where empty (as vLLM's reply has them): the splitter's pieces
    joined."""
    splitter = ReasoningSplitter(parser, thinking)
    splitter.feed(text)
    splitter.end()
    return splitter.reasoning or None, splitter.content or None
