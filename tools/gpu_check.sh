#!/usr/bin/env bash
# GPU check: on a fresh GPU machine with Python >= 3.12 and a CUDA torch already installed
# (no Megatron-Core, no Transformer Engine, no network), install megarlhf and
# megatron-core from the wheels in $GPU_WHEELS, run tests/gpu, then a short bf16 PPO and
# GRPO benchmark at TP1 on a ~1B-parameter model (tools/bench/rlhf_phases.py --model 1b: a
# 1-step SFT/RM set-up, i.e. random weights for speed purposes), and write every figure
# to one JSON file ($GPU_CHECK_JSON). Budget: 8 minutes on one H200.
#
#   make gpu-wheels          # here, with network: fills wheels/ (gitignored, ~56 MiB)
#   make gpu-check           # there: tools/gpu_check.sh
#
# Settings (environment): GPU_WHEELS (default wheels), GPU_CHECK_JSON (gpu_check.json),
# GPU_CHECK_VENV (.venv-gpu-check), GPU_CHECK_MODEL (1b), GPU_CHECK_STEPS (3),
# GPU_CHECK_BUDGET (470 s: the whole run), GPU_CHECK_BENCH_TIMEOUT (130 s per stage;
# tests/gpu get what the budget leaves after both benchmarks' shares),
# GPU_CHECK_ALLOW_CPU=1 (dry-run the flow on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=${GPU_WHEELS:-wheels}
OUT=${GPU_CHECK_JSON:-gpu_check.json}
VENV=${GPU_CHECK_VENV:-.venv-gpu-check}
MODEL=${GPU_CHECK_MODEL:-1b}
STEPS=${GPU_CHECK_STEPS:-3}
BUDGET=${GPU_CHECK_BUDGET:-470}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-130}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
BENCH=tools/bench/rlhf_phases.py
PY=${PYTHON:-python3}
t0=$(date +%s)
log() { echo "== gpu_check [$(( $(date +%s) - t0 )) s] $*"; }

# 1. The machine: Python, torch, CUDA.
log "machine"
"$PY" - "$WORK/machine.json" <<'EOF' || { echo "gpu_check: cannot import torch with $PY" >&2; exit 2; }
import json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count()}
json.dump(info, open(sys.argv[1], "w"))
print(info)
EOF
if grep -q '"gpu": null' "$WORK/machine.json" && [[ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]]; then
  echo "gpu_check: torch sees no CUDA device (set GPU_CHECK_ALLOW_CPU=1 to dry-run the flow)" >&2
  exit 2
fi
[[ -d "$WHEELS" ]] || { echo "gpu_check: no wheel folder '$WHEELS' (make gpu-wheels prepares it)" >&2; exit 2; }

# 2. Offline install: a venv that sees the machine's torch, megarlhf built from this
#    checkout, megatron-core and the other dependencies from $WHEELS only.
log "install from $WHEELS"
ti=$(date +%s)
test -x "$VENV/bin/python" || "$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" --disable-pip-version-check \
  "$REPO" megatron-core pytest pytest-timeout > "$WORK/install.log" 2>&1
install_rc=$?
install_s=$(( $(date +%s) - ti ))
[[ $install_rc -eq 0 ]] || tail -20 "$WORK/install.log"
VPY="$VENV/bin/python"

# 3. tests/gpu (junit XML: counts and per-test seconds go to the JSON).
tests_rc=-1; tests_s=0
TESTS_TIMEOUT=$(( BUDGET - ($(date +%s) - t0) - 2 * BENCH_TIMEOUT - 5 ))
if [[ $install_rc -eq 0 && $TESTS_TIMEOUT -gt 0 ]]; then
  log "tests/gpu (timeout ${TESTS_TIMEOUT} s)"
  tt=$(date +%s)
  # --timeout: one stuck test fails alone and the XML (per-test figures) is still written
  PYTHONPATH="$REPO" timeout "$TESTS_TIMEOUT" "$VPY" -m pytest tests/gpu -q -p no:cacheprovider \
    --timeout $(( TESTS_TIMEOUT / 2 )) --junitxml="$WORK/tests_gpu.xml" 2>&1 | tail -15
  tests_rc=${PIPESTATUS[0]}
  tests_s=$(( $(date +%s) - tt ))
fi

# 4. bf16 PPO and GRPO at TP1 on the ~1B model (GRPO reuses PPO's SFT set-up).
declare -A bench_rc bench_s
for stage in ppo grpo; do
  bench_rc[$stage]=-1; bench_s[$stage]=0
  [[ $install_rc -eq 0 ]] || continue
  log "bench $stage --model $MODEL (timeout ${BENCH_TIMEOUT} s)"
  tb=$(date +%s)
  PYTHONPATH="$REPO" timeout "$BENCH_TIMEOUT" "$VPY" "$BENCH" --stage "$stage" --model "$MODEL" \
    --steps "$STEPS" --warmup 1 --sft-steps 1 --rm-steps 1 --work-dir "$WORK/bench" \
    --json "$WORK/bench_$stage.json" > "$WORK/bench_$stage.log" 2>&1
  bench_rc[$stage]=$?
  bench_s[$stage]=$(( $(date +%s) - tb ))
  tail -12 "$WORK/bench_$stage.log"
done

# 5. One JSON with everything.
log "writing $OUT"
JPY=$PY; [[ -x "$VPY" ]] && JPY=$VPY
"$JPY" - "$WORK" "$OUT" <<EOF
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
def load(name):
    p = work / name
    return json.loads(p.read_text()) if p.is_file() else None
tests = {"exit_code": $tests_rc, "seconds": $tests_s, "timeout_s": $TESTS_TIMEOUT, "cases": []}
xml = work / "tests_gpu.xml"
if xml.is_file():
    for case in ET.parse(xml).iter("testcase"):
        status = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        tests["cases"].append({"test": case.get("classname") + "::" + case.get("name"),
                               "seconds": float(case.get("time", 0)), "status": status})
    for s in ("passed", "failed", "skipped"):
        tests[s] = sum(c["status"] == s for c in tests["cases"])
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
result = {
    "machine": load("machine.json"),
    "megatron_core": version("megatron-core"),
    "transformer_engine": version("transformer-engine") or version("transformer_engine"),
    "install": {"exit_code": $install_rc, "seconds": $install_s},
    "tests_gpu": tests,
    "bench": {s: {"exit_code": rc, "seconds": sec, "model": "$MODEL", "steps": $STEPS, "result": load(f"bench_{s}.json")}
              for s, rc, sec in (("ppo", ${bench_rc[ppo]}, ${bench_s[ppo]}), ("grpo", ${bench_rc[grpo]}, ${bench_s[grpo]}))},
    "total_seconds": $(( $(date +%s) - t0 )),
}
out.write_text(json.dumps(result, indent=1, default=str))
print(json.dumps({k: v for k, v in result.items() if k != "bench"}, default=str)[:2000])
for s, b in result["bench"].items():
    summary = (b["result"] or {}).get("summary")
    print(s, "exit", b["exit_code"], f"{b['seconds']} s", json.dumps(summary, default=str)[:600] if summary else "")
EOF
log "done: $OUT"
[[ $install_rc -eq 0 && $tests_rc -eq 0 && ${bench_rc[ppo]} -eq 0 && ${bench_rc[grpo]} -eq 0 ]]
