"""Tokenizer files of chat models, written by transformers, for the chat template tests.

Each family gets a small byte-level BPE with its own control tokens and its published chat
template (tests/fixtures/chat_templates/, first line a comment naming the source), saved with
`PreTrainedTokenizerFast.save_pretrained`. Where the template lives is the `layout`: "jinja"
(chat_template.jinja, transformers 5's own layout), "config" (a string in
tokenizer_config.json) or "named" (a list of named templates there, "default" among them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"


@dataclass(frozen=True)
class Family:
    template: str  # file name in TEMPLATES, without .jinja
    bos: str | None
    eos: str
    controls: tuple[str, ...]  # further special tokens the template writes
    extra: dict[str, str]  # other special tokens of tokenizer_config.json


FAMILIES = {
    "llama3": Family(
        "llama3",
        "<|begin_of_text|>",
        "<|eot_id|>",
        ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
        {},
    ),
    "mistral": Family("mistral_v03", "<s>", "</s>", ("[INST]", "[/INST]"), {"unk_token": "<unk>"}),
    "qwen2": Family(
        "qwen2",
        None,
        "<|im_end|>",
        ("<|im_start|>", "<|endoftext|>"),
        {"pad_token": "<|endoftext|>"},
    ),
}

_TEXT = """\
You are a helpful assistant. Answer briefly, and be kind to the user.
What is the capital of France? The capital of France is Paris.
Hello! How are you today? I am fine, thank you. And you?
Write a haiku about the sea: waves fold into foam, the moon pulls the tide along.
Numbers 0 1 2 3 4 5 6 7 8 9, symbols <a href="x">&amp; {"key": [1, 2]} and tabs\tand
Ünïcödé: café, naïve, 日本語, emoji 🙂 — dashes and “quotes”.
"""


def template_text(name: str) -> str:
    """The published template: the fixture file without its first (comment) line."""
    text = (TEMPLATES / f"{name}.jinja").read_text()
    return text.split("\n", 1)[1]


def _tokenizer(family: Family) -> Tokenizer:
    specials = [t for t in (family.bos, family.eos, *family.controls, *family.extra.values()) if t]
    specials = list(dict.fromkeys(specials))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT.splitlines(), trainer)
    if family.bos:  # a post-processor that adds BOS: a chat prompt must not get it twice
        bos = family.bos
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def write_chat_tokenizer(out: Path, name: str, layout: str = "jinja") -> Path:
    """Write `name`'s tokenizer files into `out` with its template in `layout`."""
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    template = template_text(family.template)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer(family),
        bos_token=family.bos,
        eos_token=family.eos,
        chat_template=template,
        **family.extra,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    jinja = out / "chat_template.jinja"
    if layout == "jinja":
        assert jinja.read_text() == template
        return out
    jinja.unlink()
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if layout == "config":
        config["chat_template"] = template
    elif layout == "named":
        config["chat_template"] = [
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
            {"name": "default", "template": template},
        ]
    else:
        raise ValueError(layout)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out
