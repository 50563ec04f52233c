#!/usr/bin/env bash
# The README's tour on a GPU host, with a deep eviction: torpord with its demo models on the
# CUDA backend, a model evicted to deep and brought back by a request, through the GPU's
# keeper. Run by `bench/gpu.sh daemon` (PYTHONPATH set there); writes $OUT/daemon-*.
# Exits non-zero when a step fails or the resume did not go through the keeper.
set -uo pipefail
OUT=${OUT:-$PWD/.bench}
STATE=$(mktemp -d /tmp/torpor-tour.XXXX)
export XDG_RUNTIME_DIR=$STATE/run   # torpord and the CLI find the same socket there
mkdir -p "$XDG_RUNTIME_DIR"
torpor() { python3 -m torpor.cli "$@"; }
fail() { echo "TOUR FAILED: $*"; status=1; }
status=0

python3 -m torpor.scheduler.daemon --state-dir "$STATE/state" --demo >"$OUT/daemon-torpord.log" 2>&1 &
daemon=$!
for _ in $(seq 120); do
  torpor status >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || break   # it died: its log says why
  sleep 1
done
torpor status || fail "torpord did not come up"

torpor generate demo-a "Once upon a time" --max-tokens 16 --temperature 0 --json \
  >"$OUT/daemon-gen1.json" || fail "first generate"
torpor ps --json >"$OUT/daemon-ps1.json"
pgrep -af "torpor.worker.pager.keeper" || fail "no keeper running for the GPU"
sleep 5   # the keeper takes the host copy in the background after load
torpor evict demo-a --to deep --json >"$OUT/daemon-evict.json" || fail "evict to deep"
torpor ps --json >"$OUT/daemon-ps2.json"
torpor generate demo-a "Once upon a time" --max-tokens 16 --temperature 0 --json \
  >"$OUT/daemon-gen2.json" || fail "generate after deep"
python3 - "$OUT" <<'EOF' || status=1
import json, sys
out = sys.argv[1]
a, b = (json.load(open(f"{out}/daemon-gen{i}.json")) for i in (1, 2))
print("tokens identical:", a.get("token_ids") == b.get("token_ids"))
print("second generate:", {k: v for k, v in b.items() if k not in ("text", "token_ids")})
sys.exit(0 if a.get("token_ids") == b.get("token_ids") else 1)
EOF
# Workers log to torpord's stderr: the worker's own line says how the weights came back.
grep '"resumed"' "$OUT/daemon-torpord.log" | tail -3 | cut -c1-400
grep '"resumed"' "$OUT/daemon-torpord.log" | grep -q '"via": "keeper"' \
  || fail "the deep resume did not go through the keeper"
torpor events --json >"$OUT/daemon-events.json" 2>/dev/null || true

kill -TERM "$daemon"; wait "$daemon"
echo "torpord exited $?"
if pgrep -f "torpor.worker.pager.keeper" >/dev/null; then fail "a keeper outlived torpord"; fi
if pgrep -f "torpor.worker.main" >/dev/null; then fail "a worker outlived torpord"; fi
grep -E "keeper_(started|stopped|failed)" "$OUT/daemon-torpord.log" | cut -c1-300
[ $status = 0 ] && echo "TOUR OK"
exit $status
