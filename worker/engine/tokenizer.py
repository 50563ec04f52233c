"""The checkpoint's tokenizer: `tokenizer.json` through `tokenizers`, with the special tokens
of `tokenizer_config.json` where present, and its chat template (`torpor.chat_template`)."""

from __future__ import annotations

from collections.abc import Sequence
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
