"""The engine: one loaded model, a static KV cache of slots, and continuous batching.

Requests wait, are admitted into free slots (one prefill each), then advance together, one
batched decode step at a time; they leave their slot when they finish, and a waiting request
takes it at the next step. The engine is single-threaded: `step()` is driven by one thread
(see `loop.EngineLoop` for the thread-safe front).

Steps are pipelined. Sampled tokens stay on the device and are fed to the next step there;
`step()` enqueues step k+1 first and only then reads step k's tokens back, so the host's
work (stop checks, detokenizing, streaming) overlaps the device's. A request that stopped at
step k has one speculative row in step k+1, whose output is discarded.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from torpor.checkpoint_files import CheckpointDir, as_checkpoint
from torpor.errors import FailedPrecondition, InvalidArgument
from torpor.log import get_logger
from torpor.v1 import common_pb2
from torpor.worker.engine.decoder import Decoder, EagerDecoder
from torpor.worker.engine.layout import Placement
from torpor.worker.engine.model import Transformer
from torpor.worker.engine.model_config import ModelConfig
from torpor.worker.engine.options import EngineOptions, resolve_device, resolve_dtype
from torpor.worker.engine.requests import (
    Alternatives,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    RequestDelta,
)
from torpor.worker.engine.runtime import LoadTimings, RuntimeMemory, WeightFiller, load_runtime
from torpor.worker.engine.sampling import RequestSampler, Sampled, sample_on_device
from torpor.worker.engine.tokenizer import Detokenizer, Tokenizer

log = get_logger("engine")


@dataclass
class _Sequence:
    """The mutable state of one admitted or waiting request (private to the engine)."""

    request: GenerationRequest
    sampler: RequestSampler
    detok: Detokenizer
    stop_ids: frozenset[int]
    slot: int = -1
    position: int = 0  # where the next fed token's KV goes
    generated: int = 0  # tokens read back and emitted
    pending: int = 0  # tokens sampled on the device, not yet read back
    done: bool = False


@dataclass
class _Pending:
    """Tokens sampled on the device for `seqs` (row i is seqs[i]), on their way to the host."""

    seqs: list[_Sequence]
    tokens: torch.Tensor  # [m] int64, host (pinned on CUDA), filled asynchronously
    logprobs: torch.Tensor  # [m] float32, host
    ready: torch.cuda.Event | None  # None on the CPU, where the copy is already done
    top_ids: torch.Tensor | None = None  # [m, k] int64, host; None when no row asked
    top_logprobs: torch.Tensor | None = None  # [m, k] float32, host


@dataclass
class EngineStats:
    """Counters for status reports and metrics."""

    prefills: int = 0
    decode_steps: int = 0
    tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class Engine:
    """Generates tokens for many concurrent requests on one loaded model."""

    def __init__(
        self,
        cfg: ModelConfig,
        options: EngineOptions,
        model: Transformer,
        memory: RuntimeMemory,
        tokenizer: Tokenizer | None,
        eos_ids: frozenset[int],
        timings: LoadTimings,
    ) -> None:
        self.cfg = cfg
        self.options = options
        self.model = model
        self.memory = memory
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.timings = timings
        self.device = model.embed.device
        self.stats = EngineStats()
        self._decoder: Decoder = EagerDecoder(model, options)
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}  # slot -> sequence
        self._free_slots = list(range(options.max_batch))
        self._ids: set[str] = set()
        self._aborted: list[str] = []
        self._inflight: list[_Pending] = []
        self._pin = self.device.type == "cuda"

    @classmethod
    def load(
        cls,
        model_dir: Path | str | CheckpointDir,
        options: EngineOptions | None = None,
        placement: Placement | None = None,
        progress: Callable[[int, int], None] | None = None,
        filler: WeightFiller | None = None,
    ) -> Engine:
        """Load a Hugging Face checkpoint directory and make it ready to serve.

        `placement` provides the memory (default: ordinary device buffers); `filler` provides
        the weight bytes (default: the directory's safetensors; the pager passes a snapshot).
        """
        options = options or EngineOptions()
        options.validate()
        ckpt = as_checkpoint(model_dir)
        ckpt.check_dir()  # swapped for a symlink out of the roots since registration?
        cfg = ModelConfig.from_dir(ckpt)
        options = options.resolved(cfg)
        device = resolve_device(options.device)
        dtype_name, compute_dtype = resolve_dtype(options.dtype, cfg, device)
        model, memory, timings = load_runtime(
            ckpt,
            cfg,
            options,
            device,
            dtype_name,
            compute_dtype,
            placement,
            progress,
            filler,
        )
        tokenizer = Tokenizer(ckpt) if ckpt.exists("tokenizer.json") else None
        engine = cls(
            cfg, options, model, memory, tokenizer, _eos_ids(ckpt, cfg, tokenizer), timings
        )
        engine.enable_graphs()
        log.info(
            "engine_loaded",
            model_dir=str(ckpt.path),
            device=str(device),
            dtype=dtype_name,
            weight_bytes=memory.weights.nbytes,
            kv_bytes=memory.kv.nbytes,
            graphs=engine.graphs_enabled,
            **engine.timings.as_dict(),
        )
        return engine

    # -- graphs ----------------------------------------------------------------------------

    @property
    def graphs_enabled(self) -> bool:
        return not isinstance(self._decoder, EagerDecoder)

    def enable_graphs(self) -> None:
        """Capture batched decode in CUDA graphs (CUDA only, when the options allow it)."""
        if self.device.type != "cuda" or not self.options.cuda_graphs:
            return
        from torpor.worker.engine.graphs import GraphDecoder

        start = time.perf_counter()
        with torch.no_grad():
            self._swap_decoder(GraphDecoder(self.model, self.options, pool=self.memory.graph_pool))
        self.timings = self.timings.with_graphs(time.perf_counter() - start)

    def disable_graphs(self) -> None:
        """Drop captured graphs and decode eagerly (before the graph memory is released)."""
        self._swap_decoder(EagerDecoder(self.model, self.options))

    def _swap_decoder(self, new: Decoder) -> None:
        # The decoders' static inputs hold the running requests' next tokens and positions.
        rows = min(len(new.tokens), len(self._decoder.tokens))
        new.tokens[:rows].copy_(self._decoder.tokens[:rows])
        new.positions[:rows].copy_(self._decoder.positions[:rows])
        self._decoder = new

    # -- requests --------------------------------------------------------------------------

    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request; raise InvalidArgument if it can never run here."""
        self._validate(request)
        stop_ids = frozenset(request.params.stop_token_ids) | (
            frozenset() if request.params.ignore_eos else self.eos_ids
        )
        seq = _Sequence(
            request=request,
            sampler=RequestSampler(request.params, self.device),
            detok=Detokenizer(self.tokenizer, request.params.stop),
            stop_ids=stop_ids,
        )
        self._ids.add(request.request_id)
        self._waiting.append(seq)

    def _validate(self, request: GenerationRequest) -> None:
        prompt, params = request.prompt_ids, request.params
        limit = self.options.max_seq_len
        if request.request_id in self._ids:
            raise InvalidArgument(
                f"request id {request.request_id!r} is already in use", reason="DUPLICATE_REQUEST"
            )
        if not prompt:
            raise InvalidArgument("the prompt is empty", reason="EMPTY_PROMPT")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidArgument(
                f"prompt token ids out of the vocabulary [0, {self.cfg.vocab_size}): {bad[:5]}",
                reason="TOKEN_OUT_OF_VOCAB",
                metadata={"token_id": bad[0], "vocab_size": self.cfg.vocab_size},
            )
        params.validate(self.cfg.vocab_size)
        if len(prompt) + params.max_tokens > limit:
            reason = "PROMPT_TOO_LONG" if len(prompt) >= limit else "MAX_TOKENS_TOO_LARGE"
            raise InvalidArgument(
                f"prompt of {len(prompt)} tokens plus max_tokens={params.max_tokens} exceeds "
                f"max_seq_len={limit}",
                reason=reason,
                metadata={"prompt_tokens": len(prompt), "max_seq_len": limit},
            )

    def abort(self, request_id: str) -> None:
        """End a request at the next step with FinishReason.ABORT (no-op if unknown)."""
        if request_id in self._ids:
            self._aborted.append(request_id)

    def request_ids(self) -> list[str]:
        """Ids of every request waiting or running."""
        return sorted(self._ids)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._aborted or self._inflight)

    @property
    def steps_in_flight(self) -> int:
        """Decode steps enqueued on the device whose tokens are not read back yet."""
        return len(self._inflight)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- the step --------------------------------------------------------------------------

    def step(self) -> list[RequestDelta]:
        """Apply aborts, admit and prefill waiting requests, enqueue the next decode step,
        then read back what earlier steps sampled; return the resulting deltas."""
        with torch.no_grad():
            deltas = self._apply_aborts()
            earlier, self._inflight = self._inflight, []
            prefilled = self._admit()
            launched = self._launch_decode()
            for pending in (*earlier, *prefilled):
                deltas += self._read(pending)
            if launched is not None:
                self._inflight.append(launched)
        return deltas

    def flush(self) -> list[RequestDelta]:
        """Read back every step in flight, so no device work remains (before a suspend)."""
        deltas: list[RequestDelta] = []
        with torch.no_grad():
            earlier, self._inflight = self._inflight, []
            for pending in earlier:
                deltas += self._read(pending)
        return deltas

    def _apply_aborts(self) -> list[RequestDelta]:
        deltas: list[RequestDelta] = []
        for request_id in self._aborted:
            seq = next((s for s in self._waiting if s.request.request_id == request_id), None)
            if seq is not None:
                self._waiting.remove(seq)
            else:
                seq = next(
                    (s for s in self._running.values() if s.request.request_id == request_id),
                    None,
                )
            if seq is not None:
                deltas.append(self._finish(seq, FinishReason.ABORT, ""))
        self._aborted.clear()
        return deltas

    def _admit(self) -> list[_Pending]:
        """Prefill waiting requests into free slots; their first tokens stay on the device."""
        prefilled: list[_Pending] = []
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            seq.slot = heapq.heappop(self._free_slots)
            self._running[seq.slot] = seq
            prompt = self._to_device(seq.request.prompt_ids)
            logits = self.model.prefill(prompt, seq.slot)  # [vocab]
            self.stats.prefills += 1
            seq.position = len(seq.request.prompt_ids)
            sampled = sample_on_device(logits[None], [seq.sampler])
            self._decoder.tokens[seq.slot : seq.slot + 1].copy_(sampled.tokens)
            self._decoder.positions[seq.slot : seq.slot + 1].fill_(seq.position)
            seq.pending += 1
            prefilled.append(self._to_host([seq], sampled))
        return prefilled

    def _launch_decode(self) -> _Pending | None:
        """Enqueue one decode step for every request that may still need a token."""
        seqs = sorted(
            (
                s
                for s in self._running.values()
                if s.generated + s.pending < s.request.params.max_tokens
            ),
            key=lambda s: s.slot,
        )
        if not seqs:
            return None
        self.model.wait_weights()  # a captured graph reads every layer's weights
        logits = self._decoder.launch(seqs[-1].slot + 1, max(s.position for s in seqs) + 1)
        slots = self._to_device([s.slot for s in seqs])
        sampled = sample_on_device(logits.index_select(0, slots), [s.sampler for s in seqs])
        # Feed the sampled tokens to the next step, on the device.
        self._decoder.tokens.index_copy_(0, slots, sampled.tokens)
        self._decoder.positions.index_add_(0, slots, torch.ones_like(slots))
        for seq in seqs:
            seq.position += 1
            seq.pending += 1
        self.stats.decode_steps += 1
        return self._to_host(seqs, sampled)

    def _to_device(self, values: tuple[int, ...] | list[int]) -> torch.Tensor:
        host = torch.tensor(values, dtype=torch.long)
        if self._pin:
            return host.pin_memory().to(self.device, non_blocking=True)
        return host

    def _to_host(self, seqs: list[_Sequence], sampled: Sampled) -> _Pending:
        """Start copying a step's picks to the host; one event covers them all, so the top
        alternatives (copied only when a row asked) add no wait of their own."""
        if not self._pin:
            return _Pending(
                seqs, sampled.tokens, sampled.logprobs, None, sampled.top_ids, sampled.top_logprobs
            )
        tokens, logprobs = self._pinned_copy(sampled.tokens), self._pinned_copy(sampled.logprobs)
        top_ids = top_logprobs = None
        if sampled.top_ids is not None and sampled.top_logprobs is not None:
            top_ids = self._pinned_copy(sampled.top_ids)
            top_logprobs = self._pinned_copy(sampled.top_logprobs)
        ready = torch.cuda.Event()
        ready.record()
        return _Pending(seqs, tokens, logprobs, ready, top_ids, top_logprobs)

    @staticmethod
    def _pinned_copy(device: torch.Tensor) -> torch.Tensor:
        host = torch.empty(device.shape, dtype=device.dtype, pin_memory=True)
        host.copy_(device, non_blocking=True)
        return host

    def _read(self, pending: _Pending) -> list[RequestDelta]:
        if pending.ready is not None:
            pending.ready.synchronize()
        rows = len(pending.seqs)
        tops: list[Alternatives | None] = [None] * rows
        if pending.top_ids is not None and pending.top_logprobs is not None:
            ids, lps = pending.top_ids.tolist(), pending.top_logprobs.tolist()
            for i, seq in enumerate(pending.seqs):
                n = seq.request.params.top_logprobs
                if n:
                    tops[i] = tuple(zip(ids[i][:n], lps[i][:n], strict=True))
        deltas = []
        for seq, token, logprob, top in zip(
            pending.seqs, pending.tokens.tolist(), pending.logprobs.tolist(), tops, strict=True
        ):
            seq.pending -= 1
            if not seq.done:  # a speculative row of a request that already finished
                deltas.append(self._emit(seq, token, logprob, top))
        return deltas

    def _emit(
        self, seq: _Sequence, token: int, logprob: float, top: Alternatives | None = None
    ) -> RequestDelta:
        seq.generated += 1
        self.stats.tokens += 1
        text = seq.detok.add(token)
        finish = None
        if seq.detok.stopped or token in seq.stop_ids:
            finish = FinishReason.STOP
        elif seq.generated >= seq.request.params.max_tokens:
            finish = FinishReason.LENGTH
        tops = () if top is None else (top,)
        if finish is None:
            return RequestDelta(seq.request.request_id, (token,), (logprob,), text, None, tops)
        return self._finish(seq, finish, text, token, logprob, tops)

    def _finish(
        self,
        seq: _Sequence,
        finish: FinishReason,
        text: str,
        token: int | None = None,
        logprob: float = 0.0,
        tops: tuple[Alternatives, ...] = (),
    ) -> RequestDelta:
        seq.done = True
        if seq.slot >= 0:
            del self._running[seq.slot]
            heapq.heappush(self._free_slots, seq.slot)
        self._ids.discard(seq.request.request_id)
        self.stats.finished[finish.value] = self.stats.finished.get(finish.value, 0) + 1
        text += seq.detok.flush() if finish is not FinishReason.ABORT else ""
        tokens, lps = ((token,), (logprob,)) if token is not None else ((), ())
        return RequestDelta(seq.request.request_id, tokens, lps, text, finish, tops)

    # -- conveniences for a single caller (torpor run, tests) -------------------------------

    def generate(self, request: GenerationRequest) -> Iterator[RequestDelta]:
        """Run one request to completion, yielding its deltas as they are produced. For a
        caller that drives the engine alone; other requests' deltas are dropped."""
        self.add_request(request)
        while True:
            for delta in self.step():
                if delta.request_id == request.request_id:
                    yield delta
                    if delta.finish is not None:
                        return

    def generate_all(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run requests together (continuous batching) and return their results in order."""
        collected: dict[str, list[RequestDelta]] = {r.request_id: [] for r in requests}
        for request in requests:
            self.add_request(request)
        while self.has_work():
            for delta in self.step():
                collected[delta.request_id].append(delta)
        return [GenerationResult.collect(r.request_id, collected[r.request_id]) for r in requests]

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise FailedPrecondition(
                "this checkpoint has no tokenizer.json, so a text prompt cannot be tokenized; "
                "send token ids (prompt_ids)",
                reason="NO_TOKENIZER",
            )
        return self.tokenizer.encode(text)

    def encode_chat(self, prompt: common_pb2.ChatPrompt) -> list[int]:
        if self.tokenizer is None:
            raise FailedPrecondition(
                "this checkpoint has no tokenizer.json, so chat messages cannot be tokenized; "
                "send token ids",
                reason="NO_TOKENIZER",
            )
        return self.tokenizer.encode_chat(prompt)


def _eos_ids(ckpt: CheckpointDir, cfg: ModelConfig, tokenizer: Tokenizer | None) -> frozenset[int]:
    """End-of-sequence ids from config.json, generation_config.json and the tokenizer."""
    ids = set(cfg.eos_token_ids)
    if ckpt.exists("generation_config.json"):
        value = ckpt.read_json_object("generation_config.json").get("eos_token_id")
        ids.update([value] if isinstance(value, int) else (value or []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
