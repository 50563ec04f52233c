"""A worker-like child process for the restore tests: snapshot a runtime, or restore one.

python -m tests.pager.restore_child snapshot MODEL_DIR STORE OUT_JSON
python -m tests.pager.restore_child restore MANIFEST_JSON STORE WORKDIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torpor.store.chunks import ChunkStore
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest, GenerationResult
from torpor.worker.engine.sampling import SamplingParams
from torpor.worker.pager.manifest import SnapshotManifest
from torpor.worker.pager.placement import PagerOptions
from torpor.worker.pager.runtime import PagedRuntime

PAGER = PagerOptions(
    device=sys.argv[-1] if sys.argv[-1].startswith("cuda") else "cpu", handle_bytes=2 << 20
)
PARAMS = SamplingParams(max_tokens=12, temperature=0.7, seed=5, ignore_eos=True)


def generate(rt: PagedRuntime) -> dict[str, object]:
    prompt = tuple(rt.engine.encode("Pages move from the device to the host"))
    result = GenerationResult.collect(
        "r", list(rt.loop.submit(GenerationRequest("r", prompt, PARAMS)))
    )
    return {"tokens": list(result.token_ids), "logprobs": list(result.logprobs)}


def main(argv: list[str]) -> None:
    if argv[0] == "snapshot":
        model_dir, store, out = Path(argv[1]), ChunkStore(Path(argv[2])), Path(argv[3])
        rt = PagedRuntime.load(model_dir, EngineOptions(max_batch=2, max_seq_len=256), PAGER)
        report = rt.snapshot(store)
        result = generate(rt) | {"manifest": report.manifest.to_json()}
        rt.close()
    else:
        manifest = SnapshotManifest.from_json(json.loads(Path(argv[1]).read_text()))
        rt = PagedRuntime.restore(manifest, ChunkStore(Path(argv[2])), Path(argv[3]), PAGER)
        honored = {n: a.address_honored for n, a in rt.placement.arenas.items()}
        result = generate(rt) | {"honored": honored, "addresses": rt.placement.arena_addresses()}
        rt.close()
        out = Path(argv[4])
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
