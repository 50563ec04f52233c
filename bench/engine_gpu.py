"""Engine benchmarks on a GPU (issue 2): cold init, decode speed against its floor, and
transformers' generate as a baseline. Each phase runs in its own process so that one phase's
memory and caches do not colour the next; results are JSON lines appended to --out.

    python bench/engine_gpu.py write-ckpt DIR          # Llama-3-8B-shaped random bf16 safetensors
    python bench/engine_gpu.py floor   --out F         # device memory bandwidth (D2D copy)
    python bench/engine_gpu.py cold    DIR --out F     # cold-init breakdown
    python bench/engine_gpu.py decode  DIR --out F     # decode tokens/s at batch 1 and 32
    python bench/engine_gpu.py hf      DIR --out F     # transformers generate, same model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

T_SPAWN = time.time()  # as early as possible: the interpreter is up

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "dtype": "bfloat16",
}
PROMPT_LEN = 128
GEN_TOKENS = 128


def emit(out: Path, record: dict) -> None:
    record["t"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def write_ckpt(out_dir: Path, config: dict, shard_bytes: int = 4 << 30) -> None:
    """Random bf16 weights of `config`'s shape, written in shards with an index."""
    import torch
    from safetensors.torch import save_file

    from torpor.worker.engine.model_config import ModelConfig
    from torpor.worker.engine.weights import weight_plan

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(gen))
    cfg = ModelConfig.from_dict(config)
    parts = [p for src in weight_plan(cfg, fp8_weights=False) for p in src.parts]
    torch.manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = [shard]
    size = 0
    for part in parts:
        std = 1.0 if part.shape[0] == 1 or len(part.shape) == 1 else part.shape[-1] ** -0.5
        t = torch.randn(part.shape, device="cuda", dtype=torch.bfloat16) * std
        if len(part.shape) == 1:
            t += 1.0
        if size + t.numel() * 2 > shard_bytes and shard:
            shard, size = {}, 0
            shards.append(shard)
        shard[part.name] = t.cpu()
        size += t.numel() * 2
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    index = {
        "metadata": {"total_size": sum(t.numel() * 2 for s in shards for t in s.values())},
        "weight_map": weight_map,
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def device_bandwidth(gib: int = 4, repeats: int = 20) -> float:
    """Bytes read + written per second by a large device-to-device copy (median)."""
    import torch

    n = gib << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n / statistics.median(times[3:])


def cold(model_dir: Path, out: Path, t_launch: float) -> None:
    """Phases of a cold start, from process launch to the first token served."""
    t_main = time.time()
    import torch

    t_torch = time.time()
    torch.cuda.init()
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()  # cuBLAS handle and workspace
    t_ctx = time.time()
    from torpor.worker.engine.engine import Engine
    from torpor.worker.engine.options import EngineOptions
    from torpor.worker.engine.requests import GenerationRequest
    from torpor.worker.engine.sampling import SamplingParams

    t_import = time.time()
    engine = Engine.load(model_dir, EngineOptions(max_batch=8, max_seq_len=1024, dtype="bfloat16"))
    t_load = time.time()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    list(engine.generate(GenerationRequest("warm", tuple(range(1, PROMPT_LEN + 1)), params)))
    torch.cuda.synchronize()
    t_warm = time.time()
    tm = engine.timings
    emit(
        out,
        {
            "bench": "cold_init",
            "model": "llama3-8b-shape",
            "dtype": "bfloat16",
            "process_start_s": t_main - t_launch,
            "import_torch_s": t_torch - t_main,
            "cuda_context_s": t_ctx - t_torch,
            "import_engine_s": t_import - t_ctx,
            "checkpoint_index_s": tm.config_s,
            "weights_load_s": tm.weights_s,
            "kv_alloc_s": tm.kv_s,
            "graph_capture_s": tm.graphs_s,
            "warmup_first_request_s": t_warm - t_load,
            "total_s": t_warm - t_launch,
            "weight_bytes": engine.memory.weights.nbytes,
            "graphs": len(engine._decoder.graphs) if engine.graphs_enabled else 0,
        },
    )


def decode(model_dir: Path, out: Path, bandwidth: float) -> None:
    import torch

    from torpor.worker.engine.engine import Engine
    from torpor.worker.engine.options import EngineOptions

    engine = Engine.load(model_dir, EngineOptions(max_batch=32, max_seq_len=1024, dtype="bfloat16"))
    embed = engine.memory.weight_tensors["embed"]
    streamed = engine.memory.weights.nbytes - embed.numel() * embed.element_size()
    floor_s = streamed / bandwidth
    for batch in (1, 32):
        steps, e2e = decode_steps(engine, batch)
        med = statistics.median(steps)
        replay = graph_replay_s(engine, batch)
        emit(
            out,
            {
                "bench": "decode",
                "model": "llama3-8b-shape",
                "dtype": "bfloat16",
                "batch": batch,
                "step_ms_median": med * 1000,
                "step_ms_p90": sorted(steps)[int(len(steps) * 0.9)] * 1000,
                "graph_replay_ms": replay * 1000,
                "host_overhead_ms": (med - replay) * 1000,
                "tokens_per_s": batch / med,
                "e2e_tokens_per_s": batch * GEN_TOKENS / e2e,
                "floor_ms": floor_s * 1000,
                "ratio_to_floor": med / floor_s,
                "weight_bytes_streamed": streamed,
                "device_bw_GBps": bandwidth / 1e9,
            },
        )
    torch.cuda.synchronize()


def decode_steps(engine, batch: int) -> tuple[list[float], float]:
    """Per-step wall times of steady-state batched decode, and one request's end-to-end time."""
    import torch

    from torpor.worker.engine.requests import GenerationRequest
    from torpor.worker.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(0, 128000, (PROMPT_LEN,), generator=g).tolist()
        engine.add_request(GenerationRequest(f"b{batch}-{i}", tuple(prompt), params))
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()  # admits every request (prefills) and decodes once
    times = []
    while engine.has_work():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    e2e = time.perf_counter() - start
    return times[5:-1], e2e


def graph_replay_s(engine, batch: int) -> float:
    """GPU time of one captured decode step alone (median of CUDA-event timings)."""
    import torch

    graph, _ = engine._decoder.graphs[batch, engine._decoder.spans[0]]
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times[5:])


def hf(model_dir: Path, out: Path) -> None:
    import torch
    import transformers

    model = (
        transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        .cuda()
        .eval()
    )
    for batch in (1, 32):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, 128000, (batch, PROMPT_LEN), generator=g).cuda()
        kw = {"do_sample": False, "pad_token_id": 0}
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS, **kw)
        torch.cuda.synchronize()
        e2e = time.perf_counter() - t
        emit(
            out,
            {
                "bench": "hf_generate",
                "model": "llama3-8b-shape",
                "dtype": "bfloat16",
                "batch": batch,
                "e2e_tokens_per_s": batch * GEN_TOKENS / e2e,
                "transformers": transformers.__version__,
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["write-ckpt", "floor", "cold", "decode", "hf"])
    parser.add_argument("dir", nargs="?", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-results.jsonl"))
    parser.add_argument("--launched", type=float, default=T_SPAWN)
    parser.add_argument("--bandwidth", type=float, default=0.0)
    args = parser.parse_args()
    if args.phase == "write-ckpt":
        t = time.time()
        write_ckpt(args.dir, LLAMA3_8B)
        print(f"wrote {args.dir} in {time.time() - t:.1f}s", file=sys.stderr)
    elif args.phase == "floor":
        import torch

        emit(
            args.out,
            {
                "bench": "floor",
                "device_bw_GBps": device_bandwidth() / 1e9,
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
            },
        )
    elif args.phase == "cold":
        cold(args.dir, args.out, args.launched)
    elif args.phase == "decode":
        decode(args.dir, args.out, args.bandwidth or device_bandwidth())
    elif args.phase == "hf":
        hf(args.dir, args.out)


if __name__ == "__main__":
    main()
