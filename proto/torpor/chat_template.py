"""Chat templates: finding a checkpoint's, checking chat messages, and rendering them the way
Hugging Face transformers' `apply_chat_template` does (issue 14).

Shared by torpord (which only finds and compiles templates: `has_chat_template`, a
registration's override) and the worker (which renders, then tokenizes). No torch here.

Where a checkpoint's template comes from, as transformers 5 loads it: `chat_template.jinja`
beside the tokenizer wins; else `tokenizer_config.json`'s `chat_template`, a string, or a list
of `{"name", "template"}` of which the one named "default" is used. A list without a
"default" gives no template.

How it renders: a sandboxed, immutable Jinja environment with trim_blocks and lstrip_blocks,
the `loopcontrols` extension and the `generation` block, the globals `raise_exception` and
`strftime_now`, a `tojson` filter that does not escape HTML, and namespaces that refuse
underscore attributes. The variables: `messages`, `add_generation_prompt`, `tools` and
`documents` (none), and the tokenizer's special tokens as strings (`bos_token`, ...).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from torpor.checkpoint_files import CheckpointDir
from torpor.errors import InvalidArgument
from torpor.v1 import common_pb2

TEMPLATE_FILE = "chat_template.jinja"
"""The file beside the tokenizer that holds the chat template (transformers 5's layout)."""

MAX_TEMPLATE_BYTES = 1 << 20
"""Longest chat template accepted, in bytes of UTF-8."""

MAX_MESSAGES = 4096
"""Most messages in one chat prompt."""

MAX_CONTENT_BYTES = 16 << 20
"""Most bytes of content, all messages together, in one chat prompt."""

ROLES = ("system", "user", "assistant")
"""The roles a chat message may have."""

SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
"""The special tokens of tokenizer_config.json a template sees, by these names."""


def checkpoint_template(ckpt: CheckpointDir) -> str | None:
    """The checkpoint's own chat template, or None when it has none."""
    if ckpt.exists(TEMPLATE_FILE):
        data = ckpt.read_bytes(TEMPLATE_FILE, limit=MAX_TEMPLATE_BYTES)
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise InvalidArgument(
                f"{ckpt.path / TEMPLATE_FILE} is not UTF-8: {exc}",
                reason="BAD_CHAT_TEMPLATE",
                metadata={"file": TEMPLATE_FILE},
            ) from exc
    if not ckpt.exists("tokenizer_config.json"):
        return None
    return config_template(ckpt.read_json_object("tokenizer_config.json"))


def config_template(config: Mapping[str, Any]) -> str | None:
    """The chat template of a tokenizer_config.json: a string, or the "default" of a list of
    named ones; None otherwise."""
    value = config.get("chat_template")
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default":
                template = entry.get("template")
                return template if isinstance(template, str) and template else None
    return None


def special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """The special tokens of a tokenizer_config.json as strings (an AddedToken object gives
    its content); those it does not set are left out (undefined in the template)."""
    tokens = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):  # the AddedToken serialization
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def check_source(source: str) -> None:
    """Refuse an override template that is too long or does not compile."""
    if len(source.encode()) > MAX_TEMPLATE_BYTES:
        raise InvalidArgument(
            f"chat_template is {len(source.encode())} bytes, more than {MAX_TEMPLATE_BYTES}",
            reason="CHAT_TEMPLATE_TOO_LONG",
            metadata={"field": "chat_template"},
        )
    compile_template(source)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in the sandbox; InvalidArgument (BAD_CHAT_TEMPLATE) when its
    syntax is wrong."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidArgument(
            f"the chat template does not compile: {exc.message} (line {exc.lineno})",
            reason="BAD_CHAT_TEMPLATE",
            metadata={"line": exc.lineno},
        ) from exc


def messages(prompt: common_pb2.ChatPrompt) -> list[dict[str, str]]:
    """The prompt's messages as the template sees them; InvalidArgument for an empty or too
    large prompt or a role that is not system, user or assistant."""
    if not prompt.messages:
        raise InvalidArgument(
            "prompt_chat has no messages",
            reason="EMPTY_PROMPT",
            metadata={"field": "prompt_chat.messages"},
        )
    if len(prompt.messages) > MAX_MESSAGES:
        raise InvalidArgument(
            f"prompt_chat has {len(prompt.messages)} messages, at most {MAX_MESSAGES}",
            reason="TOO_MANY_MESSAGES",
            metadata={"field": "prompt_chat.messages"},
        )
    size = 0
    out = []
    for i, message in enumerate(prompt.messages):
        if message.role not in ROLES:
            field = f"prompt_chat.messages[{i}].role"
            raise InvalidArgument(
                f"{field}={message.role!r} is not one of {', '.join(ROLES)}",
                reason="INVALID_CHAT_ROLE",
                metadata={"field": field, "value": message.role[:64]},
            )
        size += len(message.content.encode())
        out.append({"role": message.role, "content": message.content})
    if size > MAX_CONTENT_BYTES:
        raise InvalidArgument(
            f"prompt_chat's messages hold {size} bytes, at most {MAX_CONTENT_BYTES}",
            reason="PROMPT_TOO_LONG",
            metadata={"field": "prompt_chat.messages"},
        )
    return out


def render(
    source: str,
    chat: list[dict[str, str]],
    add_generation_prompt: bool,
    tokens: Mapping[str, str],
) -> str:
    """The conversation rendered by the template; InvalidArgument (CHAT_TEMPLATE_ERROR) with
    the template's message when it raises or fails."""
    template = compile_template(source)
    try:
        return template.render(
            {
                **tokens,
                "messages": chat,
                "tools": None,
                "documents": None,
                "add_generation_prompt": add_generation_prompt,
            }
        )
    except jinja2.TemplateError as exc:
        raise InvalidArgument(
            f"the chat template refused the messages: {exc.message or exc}",
            reason="CHAT_TEMPLATE_ERROR",
            metadata={"message": str(exc.message or exc)[:512]},
        ) from exc
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        raise InvalidArgument(
            f"the chat template failed on the messages: {type(exc).__name__}: {exc}",
            reason="CHAT_TEMPLATE_ERROR",
            metadata={"message": str(exc)[:512]},
        ) from exc


# -- the environment -------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates write them as they are.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace() without underscore attributes (no way towards the interpreter's
    internals from a template)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_attr(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_attr(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_attr(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"a chat template may not set the underscore attribute {name!r} on a namespace"
        )


class _Dict:
    """dict() for templates: builds plain dicts, exposes nothing else of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks the assistant's tokens
    with it): renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it a plain attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _Dict()
    return env
