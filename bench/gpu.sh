#!/usr/bin/env bash
# `make bench-gpu`: every GPU test and benchmark in one go, for one call of a lent GPU host.
#   bash bench/gpu.sh [all|ledger|fp8|exchange|tests|engine|pager|pagertests|pager70|pager8|baseline|probe|pin|keeper|deep|daemon|http]...
#   (default: all; pager = pagertests + pager8)
# Results land in $OUT (or .bench/): gpu.log, results.jsonl, gpu-tests.xml.
# On a host with no package registry, carried wheels in .whl/ are installed to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.bench}
mkdir -p "$OUT"
RES=$OUT/results.jsonl
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
steps=("${@:-all}")
want() { [[ " ${steps[*]} " == *" all "* || " ${steps[*]} " == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
make -s linktree
export PYTHONPATH=$PWD/build/pkg:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
date -u +%Y-%m-%dT%H:%M:%SZ

echo "== host: NUMA nodes, the GPU's node, transparent huge pages"
lscpu | grep -E "^(Model name|Socket|NUMA node)" || true
grep -H . /sys/devices/system/node/node*/meminfo 2>/dev/null | grep MemTotal || true
gpu_bus=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader | head -1 | tr 'A-F' 'a-f' | sed 's/^0000//')
cat /sys/bus/pci/devices/*"${gpu_bus#0000}"/numa_node 2>/dev/null | sed 's/^/gpu numa_node /' || true
cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag 2>/dev/null || true

if want pin; then
  echo "== pinned host memory by page kind: register, DMA, driver checkpoint"
  timeout 420 python3 bench/pin_probe.py ${PIN_MODES:-} --gib "${PIN_GIB:-16}" --out "$RES"
fi
if want keeper; then
  echo "== keeper probe: a second process owns the locked host copy and fills the worker's arena"
  timeout 240 python3 bench/keeper_probe.py --gib "${KEEPER_GIB:-64}" --cycles "${KEEPER_CYCLES:-3}" --out "$RES"
fi
if want probe; then
  echo "== deep-suspend probe: which process state the driver's checkpoint handles"
  timeout 240 python3 bench/deep_probe.py ${PROBE_VARIANTS:-} --out "$RES"
fi
if want ledger; then
  echo "== ledger: the executor never holds more than the plan counted (issue 13)"
  timeout 240 python3 -m pytest -v -m gpu tests/ledger -p no:cacheprovider \
    -W ignore::pytest.PytestConfigWarning --timeout 200 2>&1 | tee "$OUT/ledger-tests.log" \
    | grep -E "PASSED|FAILED|ERROR|passed|failed|skipped"
fi
if want fp8; then
  echo "== published FP8 checkpoints: the fp8 path against its dequantized reference (issue 15)"
  timeout 200 python3 -m pytest -v -m gpu tests/engine/test_fp8_checkpoints_gpu.py -p no:cacheprovider \
    -W ignore::pytest.PytestConfigWarning --timeout 150 2>&1 | tee "$OUT/fp8-tests.log" \
    | grep -E "PASSED|FAILED|ERROR|passed|failed|skipped"
fi
if want exchange; then
  echo "== exchange swap: two runtimes trade places on the GPU (issue 15)"
  timeout 200 python3 -m tests.pager.runtime_gpu_scenarios exchange_trades_places_within_one_copy
fi
if want tests; then
  echo "== gpu tests"
  # Modules that need packages this host lacks fail to collect, and collection goes on
  # without them. Carry what the gpu-marked ones need in .whl/: test_inventory.py's real-NVML
  # test needs SQLAlchemy (and greenlet); the others that fail hold no gpu tests.
  # -v and tee, not tail: a hang must still leave the tests that ran in the log.
  timeout 900 python3 -m pytest -v -m gpu tests -p no:cacheprovider \
    -W ignore::pytest.PytestConfigWarning --continue-on-collection-errors --timeout 300 \
    --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed"
fi

if want engine; then
  echo "== engine benchmark"
  CK=/tmp/torpor-bench/llama3-8b
  [ -f $CK/model.safetensors.index.json ] || python3 bench/engine_gpu.py write-ckpt $CK || exit 1
  python3 bench/engine_gpu.py floor --out "$RES"
  sync; if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then echo "page cache dropped"; else echo "page cache NOT dropped"; fi
  python3 bench/engine_gpu.py cold $CK --out "$RES" --launched "$(date +%s.%N)"
  python3 bench/engine_gpu.py decode $CK --out "$RES"
  python3 bench/engine_gpu.py hf $CK --out "$RES"
fi
if want pager || want pagertests; then
  echo "== pager gpu tests"
  timeout 300 python3 -m pytest -v -m gpu tests/pager/test_runtime_gpu.py tests/engine/test_fp8_quant.py \
    -p no:cacheprovider -W ignore::pytest.PytestConfigWarning --timeout 200 2>&1 \
    | tee "$OUT/pager-tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed"
fi
if want pager70; then
  echo "== pager benchmark: 70B-shaped fp8"
  timeout 300 python3 bench/pager_gpu.py runtime --shape 70b --levels "${PAGER70_LEVELS:-host,deep}" \
    --cycles "${PAGER_CYCLES:-5}" --out "$RES"
fi
if want pager || want pager8; then
  echo "== pager benchmark: 8B-shaped bf16 (deep last: it is the least proven path)"
  timeout 60 python3 bench/pager_gpu.py context --out "$RES"
  timeout 240 python3 bench/pager_gpu.py runtime --shape 8b --levels "${PAGER8_LEVELS:-host,disk,deep}" \
    --cycles "${PAGER_CYCLES:-5}" --out "$RES" --store /tmp/torpor-bench/store
fi
if want http; then
  echo "== HTTP API against gRPC on the 8B-shaped checkpoint (aiohttp comes from .whl/)"
  CK=/tmp/torpor-bench/llama3-8b
  [ -f $CK/model.safetensors.index.json ] || python3 bench/engine_gpu.py write-ckpt $CK || exit 1
  timeout 300 python3 bench/http_bench.py --backend cuda --model $CK --dtype bfloat16 \
    --rounds "${HTTP_ROUNDS:-20}" --out "$RES"
fi
if want baseline; then
  echo "== whole-process driver checkpoint of the 8B-shaped runtime (baseline)"
  timeout 180 python3 bench/pager_gpu.py baseline --shape 8b --out "$RES"
fi
if want deep; then
  echo "== deep suspend only: its GPU scenario, then the 8B-shaped runtime"
  timeout 90 python3 -m tests.pager.runtime_gpu_scenarios deep_suspend_holds_no_gpu_memory
  timeout 150 python3 bench/pager_gpu.py runtime --shape 8b --levels host,deep \
    --cycles "${PAGER_CYCLES:-3}" --out "$RES"
fi
if want daemon; then
  echo "== the README tour on the GPU: torpord, demo models, a deep eviction through the keeper"
  timeout 300 bash bench/daemon_gpu.sh
fi
echo "== done"
