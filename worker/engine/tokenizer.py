"""The checkpoint's tokenizer: `tokenizer.json` through `tokenizers`, with the special tokens
of `tokenizer_config.json` where present, and its chat template (`torpor.chat_template`)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from torpor import chat_template
from torpor.checkpoint_files import CheckpointDir, as_checkpoint
from torpor.errors import FailedPrecondition, InvalidArgument
from torpor.v1 import common_pb2


class Tokenizer:
    """Encode prompts and decode generated tokens the way the checkpoint says to."""

    def __init__(self, model_dir: Path | CheckpointDir) -> None:
        ckpt = as_checkpoint(model_dir)
        if not ckpt.exists("tokenizer.json"):
            raise InvalidArgument(
                f"{ckpt.path}: no tokenizer.json (use --prompt-ids to pass token ids directly)",
                reason="NO_TOKENIZER",
                metadata={"path": str(ckpt.path)},
            )
        try:
            self._tok = HFTokenizer.from_str(ckpt.read_bytes("tokenizer.json").decode())
        except (ValueError, Exception) as exc:  # tokenizers raises its own Exception type
            raise InvalidArgument(
                f"{ckpt.path / 'tokenizer.json'} is not a readable tokenizer: {exc}",
                reason="BAD_TOKENIZER",
                metadata={"file": "tokenizer.json"},
            ) from exc
        config: dict[str, Any] = (
            ckpt.read_json_object("tokenizer_config.json")
            if ckpt.exists("tokenizer_config.json")
            else {}
        )
        self._byte_level = _uses_byte_level(json.loads(ckpt.read_bytes("tokenizer.json")))
        self._added = {int(i): t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        self._bytes: dict[int, bytes] = {}
        self.bos_token_id = self._special_id(config.get("bos_token"))
        self.eos_token_id = self._special_id(config.get("eos_token"))
        self.add_bos: bool | None = config.get("add_bos_token")
        self.special_tokens = chat_template.special_tokens(config)
        self.chat_template: str | None = chat_template.checkpoint_template(ckpt)

    def use_chat_template(self, source: str) -> None:
        """Replace the checkpoint's chat template with `source` (a registration's override);
        InvalidArgument when it does not compile."""
        chat_template.check_source(source)
        self.chat_template = source

    def _special_id(self, token: Any) -> int | None:
        if isinstance(token, dict):  # the older AddedToken serialization
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, with the special tokens the tokenizer's post-processor adds,
        corrected by `add_bos_token` of tokenizer_config.json where it says otherwise."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=True).ids
        bos = self.bos_token_id
        if bos is not None and self.add_bos is True and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        elif bos is not None and self.add_bos is False and ids and ids[0] == bos:
            ids.pop(0)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the output, before any UTF-8 decoding: through the
        GPT-2 byte table for a byte-level BPE vocabulary (so a token may hold part of a
        character); for a sentencepiece-style one, `<0xNN>` is the byte NN and "▁" a space.
        An added (special) token is its content in UTF-8; an id outside the vocabulary is
        empty."""
        cached = self._bytes.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._added:
            out = self._added[token_id].encode()
        else:
            piece = self._tok.id_to_token(token_id)
            if piece is None:
                out = b""
            elif self._byte_level:
                out = byte_level_bytes(piece)
            else:
                out = sentencepiece_bytes(piece)
        self._bytes[token_id] = out
        return out

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> str:
        """The conversation rendered by the chat template, as transformers renders it."""
        if not self.chat_template:
            raise FailedPrecondition(
                "this model has no chat template (none in the checkpoint, none registered): "
                "send prompt_text or prompt_token_ids, or register it with a chat template",
                reason="NO_CHAT_TEMPLATE",
            )
        return chat_template.render(
            self.chat_template, messages, add_generation_prompt, self.special_tokens
        )

    def encode_chat(self, prompt: common_pb2.ChatPrompt) -> list[int]:
        """Token ids of a chat prompt: the rendered text tokenized without special tokens
        added (the template writes its own BOS), as transformers' tokenize=True does."""
        text = self.apply_chat_template(
            chat_template.messages(prompt), prompt.add_generation_prompt
        )
        return list(self._tok.encode(text, add_special_tokens=False).ids)


def _uses_byte_level(spec: dict[str, Any]) -> bool:
    """Whether tokenizer.json decodes through the byte-level (GPT-2) byte table: its decoder,
    or one of a Sequence decoder's, is ByteLevel."""
    decoder = spec.get("decoder")
    if not isinstance(decoder, dict):
        return False
    parts = decoder.get("decoders") if decoder.get("type") == "Sequence" else [decoder]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts or [])


@cache
def _byte_of_char() -> dict[str, int]:
    """The inverse of the GPT-2 byte table: byte-level BPE writes the printable bytes
    ("!".."~", "¡".."¬", "®".."ÿ") as the characters of the same code point, and every other
    byte, in increasing order, as the characters from U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shown = set(printable)
    others = (b for b in range(256) if b not in shown)
    table.update({chr(0x100 + n): b for n, b in enumerate(others)})
    return table


def byte_level_bytes(piece: str) -> bytes:
    """A byte-level BPE token's bytes; a character outside the byte table (not a byte-level
    piece) stands for its own UTF-8."""
    table = _byte_of_char()
    out = bytearray()
    for ch in piece:
        b = table.get(ch)
        if b is None:
            out += ch.encode()
        else:
            out.append(b)
    return bytes(out)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def sentencepiece_bytes(piece: str) -> bytes:
    """A sentencepiece-style token's bytes: a byte-fallback token `<0xNN>` is that byte, and
    "▁" (U+2581) is a space; the rest is UTF-8."""
    m = _BYTE_FALLBACK.fullmatch(piece)
    if m is not None:
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


class Detokenizer:
    """Turns one request's generated ids into text incrementally, and applies stop strings.

    Text is released only when it is final: not the start of a multi-byte character still
    being generated (decoders emit U+FFFD for those) and not a possible start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str]) -> None:
        self._tok = tokenizer
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] decode to text already accounted for
        self._read = 0
        self.text = ""  # all text so far (stop string excluded once hit)
        self._released = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add a token; return newly final text. Sets `stopped` when a stop string appears."""
        if self._tok is None or self.stopped:
            return ""
        self._ids.append(token_id)
        self._advance(final=False)
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """All text not yet released (at the end of generation), including the bytes of an
        unfinished character."""
        if self._tok is not None and not self.stopped:
            self._advance(final=True)
        return self._release(final=True)

    def _advance(self, final: bool) -> None:
        assert self._tok is not None
        if self._read == len(self._ids):
            return
        before = self._tok.decode(self._ids[self._prefix : self._read])
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            start = len(self.text)
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
            self._apply_stop(start)

    def _apply_stop(self, start: int) -> None:
        longest = max((len(s) for s in self._stop), default=0)
        window_start = max(0, start - longest + 1)
        hits = [i for s in self._stop if (i := self.text.find(s, window_start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self._released : end] if end > self._released else ""
        self._released = max(self._released, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that could begin a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
