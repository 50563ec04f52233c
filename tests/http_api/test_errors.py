"""Every error of the HTTP API through the `openai` SDK's exception types: OpenAI's JSON
shape, the status of torpor's one code table (errors.WIRE), and a client that goes away
mid-stream freeing its slot (issue 14)."""

from __future__ import annotations

import json
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.daemon.conftest import call
from tests.helpers import assert_eventually
from tests.http_api.conftest import Served, free_port, serve
from torpor.scheduler.auth import Scope, new_token
from torpor.v1 import admin_pb2
from torpor.worker.engine.demo import DemoSpec, make_demo


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "MODEL_NOT_FOUND"
    assert body["type"] == "not_found_error" and "nope" in body["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"n": 2}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_a_field_torpor_does_not_implement_is_400_naming_it(
    client: openai.OpenAI, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="alpha", prompt="x", max_tokens=1, extra_body=extra)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    assert body["type"] == "invalid_request_error"


def test_a_neutral_value_of_an_unimplemented_field_is_accepted(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="alpha", prompt="x", max_tokens=1, presence_penalty=0, frequency_penalty=0
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 1


def test_a_body_that_is_not_json_and_an_unknown_route_keep_the_error_shape(
    served: Served,
) -> None:
    for path, data, status in [
        ("/completions", b"{not json", 400),
        ("/nothing-here", b"{}", 404),
    ]:
        request = urllib.request.Request(
            served.base_url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        assert info.value.code == status
        assert set(json.loads(info.value.read())["error"]) == {"message", "type", "param", "code"}


def test_a_full_queue_is_429_with_retry_after(model_root: Path) -> None:
    """queue_bound 1: while one request waits for alpha's load, a second one is refused."""
    with tempfile.TemporaryDirectory(prefix="torpor-") as tmp:
        s = serve(Path(tmp), model_root, TORPOR_POLICY_QUEUE_BOUND="1")
        try:
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(
                    s.client().completions.create, model="alpha", prompt="x", max_tokens=1
                )
                assert_eventually(lambda: state_of(s, "alpha"), lambda st: st != "cold")
                with pytest.raises(openai.RateLimitError) as info:
                    s.client().completions.create(model="alpha", prompt="x", max_tokens=1)
                assert first.result(timeout=120).choices[0].finish_reason is not None
            assert info.value.response.headers["Retry-After"] == "1"
            assert info.value.body["code"] == "QUEUE_FULL"  # type: ignore[index]
        finally:
            assert s.daemon.stop() == 0


def state_of(served: Served, model: str) -> str:
    return next(m.torpor["state"] for m in served.client().models.list().data if m.id == model)  # type: ignore[attr-defined]


def test_api_keys_are_required_when_configured(model_root: Path) -> None:
    key = new_token(Scope.CLIENT, "http-test")
    with tempfile.TemporaryDirectory(prefix="torpor-") as tmp:
        keys = Path(tmp) / "api-keys"
        keys.write_text(key.line + "\n")
        s = serve(Path(tmp), model_root, TORPOR_DAEMON_API_KEYS_FILE=str(keys))
        try:
            for wrong in ("none", key.token + "x"):
                with pytest.raises(openai.AuthenticationError) as info:
                    s.client(api_key=wrong).models.list()
                assert info.value.body["code"] == "BAD_API_KEY"  # type: ignore[index]
            assert len(s.client(api_key=key.token).models.list().data) == 3
        finally:
            assert s.daemon.stop() == 0


def test_a_client_gone_mid_stream_frees_its_slot(served: Served) -> None:
    client = served.client()
    stream = client.completions.create(
        model="alpha",
        prompt="x",
        max_tokens=200,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))  # it runs: a lease holds its runtime
    assert runtime_leases(served, "alpha") == 1
    stream.response.close()  # the client goes away
    assert_eventually(lambda: runtime_leases(served, "alpha"), lambda n: n == 0, timeout=30)


def runtime_leases(served: Served, model: str) -> int:
    residency = call(
        served.daemon.admin.ListResidency, admin_pb2.ListResidencyRequest(include_cold=True)
    )
    return next(r.leases for r in residency.runtimes if r.model == model)


def test_metrics_count_requests_by_endpoint_and_status(model_root: Path) -> None:
    """torpor_http_requests_total sees the status the client got, errors included."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="torpor-") as tmp:
        s = serve(Path(tmp), model_root, metrics_port=port)
        try:
            client = s.client()
            client.completions.create(model="alpha", prompt="x", max_tokens=1)
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="nope", prompt="x", max_tokens=1)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
            lines = text.decode().splitlines()
            for status in ("200", "404"):
                labels = f'endpoint="/v1/completions",status="{status}"'
                wanted = f"torpor_http_requests_total{{{labels}}} 1.0"
                assert wanted in lines, [x for x in lines if "http_requests" in x]
            assert 'torpor_requests_total{code="OK",model="alpha"} 1.0' in lines
        finally:
            assert s.daemon.stop() == 0


def test_a_model_that_can_never_fit_is_400_with_the_reason(
    served: Served, client: openai.OpenAI, model_root: Path
) -> None:
    big = model_root / "too-big-http"  # 33 MiB of weights: more than the whole device
    if not big.exists():
        make_demo(big, DemoSpec(layers=4, hidden=384, heads=6, kv_heads=2, vocab=3072))
    served.daemon.register("too-big", big)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="too-big", prompt="x", max_tokens=1)
    body = info.value.body
    assert body["code"] == "NEVER_FITS" and "never fit" in body["message"]  # type: ignore[index]
