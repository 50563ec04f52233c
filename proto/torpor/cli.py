"""`torpor`: the command line.

Standalone commands (`run`, `make-demo`) load the engine in this process; the daemon's
client commands talk to torpord over gRPC. Heavy modules are imported inside the commands,
so `torpor --help` stays fast and the client commands never import torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from torpor.errors import Code, TorporError
from torpor.scheduler.client import register as register_client_commands

app = typer.Typer(
    name="torpor",
    help="Page initialized LLM runtimes between GPU, host RAM and NVMe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_USAGE_CODES = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS}


def fail(err: TorporError) -> NoReturn:
    """Print a one-line reason and exit non-zero (2 for bad input, 1 otherwise)."""
    typer.echo(f"torpor: error: {err.message}", err=True)
    raise typer.Exit(2 if err.code in _USAGE_CODES else 1)


def _parse_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        from torpor.errors import InvalidArgument

        fail(InvalidArgument(f"--prompt-ids must be comma-separated integers, got {text!r}"))


@app.command()
def run(
    model_dir: Annotated[Path, typer.Argument(help="A Hugging Face checkpoint directory.")],
    prompt: Annotated[
        str | None, typer.Argument(help="Prompt text (tokenized as the checkpoint says).")
    ] = None,
    prompt_ids: Annotated[
        str | None, typer.Option(help="Comma-separated token ids, used exactly as given.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 keeps all.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="A stop string (repeatable).")] = None,
    ignore_eos: Annotated[
        bool, typer.Option(help="Do not stop at end-of-sequence tokens.")
    ] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16, fp8 or auto.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    max_seq_len: Annotated[int, typer.Option(help="KV-cache length; 0 fits the request.")] = 0,
    cuda_graphs: Annotated[bool, typer.Option(help="Capture decode in CUDA graphs.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Generate once from a checkpoint, with no daemon."""
    from torpor import log
    from torpor.worker.engine.options import EngineOptions
    from torpor.worker.engine.sampling import SamplingParams
    from torpor.worker.standalone import prompt_tokens, run_once

    log.configure(level="warning")
    try:
        ids = prompt_tokens(model_dir, prompt, _parse_ids(prompt_ids))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(stop or ()),
            ignore_eos=ignore_eos,
        )
        options = EngineOptions(
            max_batch=1,
            max_seq_len=max_seq_len,
            dtype=dtype,
            device=device,
            cuda_graphs=cuda_graphs,
        )
        on_text = None if as_json else _stream_text
        result = run_once(model_dir, ids, params, options, on_text)
    except TorporError as err:
        fail(err)
    if as_json:
        typer.echo(json.dumps(result.as_json()))
    else:
        summary = result.as_json()
        typer.echo("")
        typer.echo(
            f"[{len(result.result.token_ids)} tokens, {result.result.finish.value}; load "
            f"{result.load_s:.2f}s, first token {result.first_token_s * 1000:.1f} ms, "
            f"{summary['decode_tokens_per_s']} tokens/s]",
            err=True,
        )


def _stream_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command("make-demo")
def make_demo(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 2,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 128,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    kv_heads: Annotated[int, typer.Option(help="Key/value heads (grouped-query attention).")] = 2,
    vocab: Annotated[int, typer.Option(help="Vocabulary size (>= 300).")] = 512,
    intermediate: Annotated[int, typer.Option(help="MLP size; 0 picks about 2.7 x hidden.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a small random-weight Llama checkpoint in the Hugging Face format."""
    from torpor.units import format_size
    from torpor.worker.engine.demo import DemoSpec
    from torpor.worker.engine.demo import make_demo as write_demo

    spec = DemoSpec(
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        intermediate=intermediate,
        seed=seed,
    )
    try:
        out = write_demo(out_dir, spec)
    except TorporError as err:
        fail(err)
    size = sum(p.stat().st_size for p in out.iterdir())
    typer.echo(f"wrote {out} ({format_size(size)})")


# The daemon's client commands (ps, generate, acquire, ...) and the global options they share.
register_client_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
