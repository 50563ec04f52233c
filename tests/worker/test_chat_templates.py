"""Chat prompts render and tokenize exactly as Hugging Face transformers does (issue 14).

The token ids torpor's Tokenizer makes of a conversation must equal
`AutoTokenizer.from_pretrained(dir).apply_chat_template(messages, add_generation_prompt=...,
tokenize=True)` for the published templates of Llama 3, Mistral v0.3 and Qwen2, wherever the
checkpoint keeps its template.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from tests.worker.chat_checkpoints import FAMILIES, write_chat_tokenizer
from torpor import chat_template
from torpor.checkpoint_files import as_checkpoint
from torpor.errors import FailedPrecondition, InvalidArgument
from torpor.v1 import common_pb2
from torpor.worker.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
HELLO = {"role": "user", "content": "Hello! What is the capital of France?"}
PARIS = {"role": "assistant", "content": "  The capital of France is Paris.  \n"}
AGAIN = {"role": "user", "content": 'And 日本? Write {"key": [1, 2]} & <a href="x">, 🙂'}
SPECIALS = {"role": "user", "content": "spaces   and\ttabs\n\nnew lines; a stray </s> <|im_end|>"}

CONVERSATIONS = {
    "system+user": [SYSTEM, HELLO],
    "user": [HELLO],
    "multi-turn": [HELLO, PARIS, AGAIN],
    "system+multi-turn": [SYSTEM, HELLO, PARIS, AGAIN],
    "ends-with-assistant": [SYSTEM, HELLO, PARIS],
    "control-text": [SPECIALS],
    "empty-content": [{"role": "user", "content": ""}],
}


def prompt(messages: list[dict[str, str]], add_generation_prompt: bool) -> common_pb2.ChatPrompt:
    return common_pb2.ChatPrompt(
        messages=[common_pb2.ChatMessage(**m) for m in messages],
        add_generation_prompt=add_generation_prompt,
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("chat")
    return {
        (name, layout): write_chat_tokenizer(root / name / layout, name, layout)
        for name in FAMILIES
        for layout in ("jinja", "config", "named")
    }


def hf_ids(model_dir: Path, messages: list[dict[str, str]], add: bool) -> list[int]:
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    out = hf.apply_chat_template(
        messages, add_generation_prompt=add, tokenize=True, return_dict=False
    )
    return list(out)


@pytest.mark.parametrize("layout", ["jinja", "config", "named"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_ids_equal_transformers(checkpoints, family: str, layout: str) -> None:
    model_dir = checkpoints[(family, layout)]
    ours = Tokenizer(model_dir)
    compared = 0
    for name, messages in CONVERSATIONS.items():
        for add in (True, False):
            try:
                expected = hf_ids(model_dir, messages, add)
            except jinja2.TemplateError:  # the template refuses it (Mistral: no assistant last)
                with pytest.raises(InvalidArgument) as err:
                    ours.encode_chat(prompt(messages, add))
                assert err.value.reason == "CHAT_TEMPLATE_ERROR", name
                continue
            assert ours.encode_chat(prompt(messages, add)) == expected, (name, add)
            compared += 1
    assert compared >= 10


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rendered_text_equals_transformers(checkpoints, family: str) -> None:
    model_dir = checkpoints[(family, "jinja")]
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ours = Tokenizer(model_dir)
    for add in (True, False):
        messages = [SYSTEM, HELLO, PARIS, AGAIN]
        expected = hf.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
        assert ours.apply_chat_template(messages, add) == expected


def test_the_published_templates_render_as_their_models_expect(checkpoints) -> None:
    """The fixtures are the real templates: spot checks of what each renders."""
    messages = [SYSTEM, HELLO]
    llama = Tokenizer(checkpoints[("llama3", "jinja")]).apply_chat_template(messages, True)
    assert llama == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{SYSTEM['content']}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        f"{HELLO['content']}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    mistral = Tokenizer(checkpoints[("mistral", "jinja")]).apply_chat_template(messages, True)
    assert mistral == f"<s>[INST] {SYSTEM['content']}\n\n{HELLO['content']}[/INST]"
    qwen = Tokenizer(checkpoints[("qwen2", "config")]).apply_chat_template([HELLO], True)
    assert qwen == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{HELLO['content']}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_template_that_raises_is_chat_template_error(checkpoints) -> None:
    ours = Tokenizer(checkpoints[("mistral", "jinja")])
    with pytest.raises(InvalidArgument) as err:
        ours.encode_chat(prompt([HELLO, AGAIN], True))  # two user turns in a row
    assert err.value.reason == "CHAT_TEMPLATE_ERROR"
    assert "roles must alternate" in str(err.value)


def test_a_bad_role_names_the_field(checkpoints) -> None:
    ours = Tokenizer(checkpoints[("llama3", "jinja")])
    bad = prompt([SYSTEM, {"role": "tool", "content": "x"}], True)
    with pytest.raises(InvalidArgument) as err:
        ours.encode_chat(bad)
    assert err.value.reason == "INVALID_CHAT_ROLE"
    assert err.value.metadata["field"] == "prompt_chat.messages[1].role"


def test_no_messages_is_an_empty_prompt(checkpoints) -> None:
    with pytest.raises(InvalidArgument) as err:
        Tokenizer(checkpoints[("llama3", "jinja")]).encode_chat(common_pb2.ChatPrompt())
    assert err.value.reason == "EMPTY_PROMPT"


def test_no_template_is_failed_precondition(checkpoints, tmp_path: Path) -> None:
    model_dir = write_chat_tokenizer(tmp_path / "m", "llama3", "config")
    config = (model_dir / "tokenizer_config.json").read_text()
    (model_dir / "tokenizer_config.json").write_text(
        config.replace('"chat_template"', '"no_chat_template"')
    )
    ours = Tokenizer(model_dir)
    assert chat_template.checkpoint_template(as_checkpoint(model_dir)) is None
    with pytest.raises(FailedPrecondition) as err:
        ours.encode_chat(prompt([HELLO], True))
    assert err.value.reason == "NO_CHAT_TEMPLATE"


def test_a_named_list_without_default_has_no_template() -> None:
    named = [{"name": "x", "template": "y"}]
    assert chat_template.config_template({"chat_template": named}) is None
    assert chat_template.config_template({"chat_template": ""}) is None


def test_the_jinja_file_wins_over_the_config(checkpoints, tmp_path: Path) -> None:
    model_dir = write_chat_tokenizer(tmp_path / "m", "qwen2", "config")
    (model_dir / "chat_template.jinja").write_text("{{ bos_token }}JINJA{{ messages[0].content }}")
    assert Tokenizer(model_dir).apply_chat_template([HELLO]) == "JINJA" + HELLO["content"]


def test_an_override_replaces_the_checkpoints_template(checkpoints) -> None:
    ours = Tokenizer(checkpoints[("llama3", "jinja")])
    ours.use_chat_template("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert ours.apply_chat_template([HELLO]) == "[user]" + HELLO["content"]
    with pytest.raises(InvalidArgument) as err:
        ours.use_chat_template("{% for m in messages %}")
    assert err.value.reason == "BAD_CHAT_TEMPLATE"


def test_the_environment_matches_transformers_helpers() -> None:
    source = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% endfor %}{{ strftime_now('%Y') | length }}"
        "{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}"
        "{% generation %}{{ eos_token }}{% endgeneration %}"
    )
    chat = [{"role": "user", "content": "<&>é"}, {"role": "user", "content": "second"}]
    text = chat_template.render(source, chat, False, {"eos_token": "</s>"})
    assert text == '{"role": "user", "content": "<&>é"}41</s>'
    with pytest.raises(InvalidArgument) as err:
        chat_template.render("{% set ns = namespace() %}{% set ns._x = 1 %}", chat, False, {})
    assert err.value.reason == "CHAT_TEMPLATE_ERROR"
