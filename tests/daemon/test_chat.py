"""Chat prompts through torpord (issue 14): has_chat_template at registration, a registered
override reaching the worker, prompt_chat forwarded unchanged, and a model without a template
refused before anything is restored."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.conftest import MAX_SEQ_LEN, Torpord, call, start_torpord
from torpor.errors import FailedPrecondition, InvalidArgument
from torpor.v1 import common_pb2, scheduler_pb2
from torpor.worker.engine.demo import DemoSpec, make_demo

transformers = pytest.importorskip("transformers")

CHAT = [
    {"role": "system", "content": "You are a small model."},
    {"role": "user", "content": "The quick brown fox"},
]
OVERRIDE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


@pytest.fixture(scope="module")
def chat_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chat-models")
    make_demo(root / "chatty", DemoSpec(layers=2, hidden=128, vocab=512))  # has a template
    shutil.copytree(root / "chatty", root / "bare")
    config = json.loads((root / "bare" / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (root / "bare" / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def torpord(tmp_path: Path, chat_root: Path) -> Iterator[Torpord]:
    daemon = start_torpord(tmp_path / "state", chat_root, memory=256 << 20)
    yield daemon
    assert daemon.stop() == 0


def register(torpord: Torpord, name: str, source: Path, template: str = "") -> common_pb2.Model:
    spec = common_pb2.ModelSpec(
        name=name,
        source=str(source),
        dtype=common_pb2.DTYPE_FLOAT32,
        max_batch=2,
        max_seq_len=MAX_SEQ_LEN,
    )
    request = scheduler_pb2.RegisterModelRequest(spec=spec, chat_template=template)
    return call(torpord.scheduler.RegisterModel, request).model


def chat(torpord: Torpord, model: str, messages: list[dict[str, str]]) -> list:
    request = scheduler_pb2.GenerateRequest(
        model=model,
        prompt_chat=common_pb2.ChatPrompt(
            messages=[common_pb2.ChatMessage(**m) for m in messages], add_generation_prompt=True
        ),
        sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
    )
    return call(torpord.scheduler.Generate, request, timeout=120)


def hf_ids(model_dir: Path, template: str | None = None) -> list[int]:
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    out = hf.apply_chat_template(
        CHAT, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(out)


def test_chat_prompts_through_torpord(torpord: Torpord, chat_root: Path) -> None:
    assert register(torpord, "chatty", chat_root / "chatty").has_chat_template
    assert not register(torpord, "bare", chat_root / "bare").has_chat_template
    override = register(torpord, "custom", chat_root / "bare", OVERRIDE)
    assert override.has_chat_template
    listed = call(torpord.scheduler.ListModels, scheduler_pb2.ListModelsRequest()).models
    assert {m.spec.name: m.has_chat_template for m in listed} == {
        "bare": False,
        "chatty": True,
        "custom": True,
    }

    # No template: refused at torpord, before anything is loaded.
    with pytest.raises(FailedPrecondition) as err:
        chat(torpord, "bare", CHAT)
    assert err.value.reason == "NO_CHAT_TEMPLATE"
    assert torpord.runtime("bare").state == common_pb2.RUNTIME_STATE_COLD

    with pytest.raises(InvalidArgument) as bad:
        chat(torpord, "chatty", [{"role": "narrator", "content": "x"}])
    assert bad.value.metadata["field"] == "prompt_chat.messages[0].role"

    # The checkpoint's template: the same tokens as the ids transformers makes.
    expected = hf_ids(chat_root / "chatty")
    chunks = chat(torpord, "chatty", CHAT)
    assert chunks[-1].usage.prompt_tokens == len(expected)
    by_ids = torpord.generate("chatty", expected, max_tokens=6)
    assert [t for c in chunks for t in c.token_ids] == [t for c in by_ids for t in c.token_ids]

    # The registered override reaches the worker.
    chunks = chat(torpord, "custom", CHAT)
    assert chunks[-1].usage.prompt_tokens == len(hf_ids(chat_root / "bare", OVERRIDE))


def test_a_template_that_does_not_compile_is_refused(torpord: Torpord, chat_root: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        register(torpord, "broken", chat_root / "chatty", "{% for m in messages %}")
    assert err.value.reason == "BAD_CHAT_TEMPLATE"
    models = call(torpord.scheduler.ListModels, scheduler_pb2.ListModelsRequest()).models
    assert [m.spec.name for m in models] == []
