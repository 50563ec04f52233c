"""Generate from a chat prompt through a real `torpor-worker` subprocess (issue 14): the prompt
it runs is the token ids transformers makes of the conversation, with the checkpoint's template
or the one torpord passes in WorkerLoadRequest.chat_template."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.worker.chat_checkpoints import TEMPLATES, template_text
from tests.worker.test_worker_service import Worker, tokens
from torpor.errors import FailedPrecondition, InvalidArgument
from torpor.v1 import common_pb2, worker_pb2
from torpor.worker.engine.demo import DemoSpec, make_demo

transformers = pytest.importorskip("transformers")

CHAT = [
    {"role": "system", "content": "You are a small model."},
    {"role": "user", "content": "Once upon a time"},
    {"role": "assistant", "content": "there was a model."},
    {"role": "user", "content": "The quick brown fox"},
]
OVERRIDE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{{ eos_token }}"


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(
        tmp_path_factory.mktemp("chat") / "m", DemoSpec(layers=2, hidden=128, vocab=512)
    )


@pytest.fixture(scope="module")
def bare_dir(plain_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo without its chat template."""
    out = tmp_path_factory.mktemp("chat") / "bare"
    shutil.copytree(plain_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def templated_dir(plain_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat") / "templated"
    shutil.copytree(plain_dir, out)
    # It wins over the demo's own template in tokenizer_config.json.
    (out / "chat_template.jinja").write_text(template_text("llama3"))
    return out


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(tmp_path, tmp_path / "store")
    yield w
    w.close()


def load(worker: Worker, model_dir: Path, chat_template: str = "") -> None:
    worker.call(
        "Load",
        worker_pb2.WorkerLoadRequest(
            model="chat",
            source=common_pb2.TIER_SOURCE,
            model_dir=str(model_dir),
            model_roots=[str(model_dir)],
            max_batch=2,
            max_seq_len=256,
            target=common_pb2.RUNTIME_STATE_RESIDENT,
            keep_host_copy=False,
            chat_template=chat_template,
        ),
    )


def chat_request(messages: list[dict[str, str]]) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(
        request_id="chat",
        prompt_chat=common_pb2.ChatPrompt(
            messages=[common_pb2.ChatMessage(**m) for m in messages], add_generation_prompt=True
        ),
        sampling=common_pb2.SamplingParams(max_tokens=8, ignore_eos=True),
    )


def ids_request(ids: list[int]) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(
        request_id="ids",
        prompt_token_ids=common_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(max_tokens=8, ignore_eos=True),
    )


def hf_ids(model_dir: Path, chat_template: str | None = None) -> list[int]:
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    out = hf.apply_chat_template(
        CHAT,
        chat_template=chat_template,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return list(out)


def test_a_chat_prompt_runs_the_ids_transformers_makes(worker: Worker, templated_dir: Path) -> None:
    assert (TEMPLATES / "llama3.jinja").is_file()
    load(worker, templated_dir)
    expected = hf_ids(templated_dir)
    chat = worker.call("Generate", chat_request(CHAT))
    assert chat[-1].usage.prompt_tokens == len(expected)
    assert tokens(chat) == tokens(worker.call("Generate", ids_request(expected)))
    assert len(tokens(chat)) == 8

    with pytest.raises(InvalidArgument) as err:
        worker.call("Generate", chat_request([{"role": "robot", "content": "beep"}]))
    assert err.value.reason == "INVALID_CHAT_ROLE"
    assert err.value.metadata["field"] == "prompt_chat.messages[0].role"


def test_the_load_requests_template_replaces_the_checkpoints(
    worker: Worker, templated_dir: Path
) -> None:
    with pytest.raises(InvalidArgument) as err:
        load(worker, templated_dir, chat_template="{% if %}")
    assert err.value.reason == "BAD_CHAT_TEMPLATE"
    load(worker, templated_dir, chat_template=OVERRIDE)  # refused, so nothing was loaded
    expected = hf_ids(templated_dir, OVERRIDE)
    chat = worker.call("Generate", chat_request(CHAT))
    assert chat[-1].usage.prompt_tokens == len(expected)
    assert tokens(chat) == tokens(worker.call("Generate", ids_request(expected)))


def test_a_model_without_a_template_refuses_chat(worker: Worker, bare_dir: Path) -> None:
    load(worker, bare_dir)
    with pytest.raises(FailedPrecondition) as err:
        worker.call("Generate", chat_request(CHAT))
    assert err.value.reason == "NO_CHAT_TEMPLATE"
