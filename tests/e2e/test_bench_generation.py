"""tools/bench/generation_vs_hf.py end to end on a tiny Llama: transformers' own greedy
`generate` on the same weights is the oracle for the engine's tokens, here through the
compiled decode step (generation.compile); --profile's matrix-product times are parts of
each side's call."""

from __future__ import annotations

import json
import sys

from tests.e2e.test_cli_selfcheck import run


def test_bench_generation_compiled_matches_transformers(tmp_path):
    out = run([
        sys.executable, "tools/bench/generation_vs_hf.py", "--layers", "2", "--hidden", "64", "--heads", "4",
        "--kv-heads", "2", "--ffn", "128", "--vocab", "64", "--prompt", "8", "--new", "6",
        "--batch", "1", "3", "--repeats", "1", "--compile", "--profile", "--json", str(tmp_path / "gen.json"),
    ])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "gen.json").read_text())
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["same_greedy_tokens"], r
        assert r["megarlhf_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0
        # Both sides multiply matrices, and within one profiled call the products take part
        # of the call's time (comparing with another, unprofiled call would be a timing race:
        # at this size the profiler's per-op overhead is most of a call).
        assert r["megarlhf_matmul_s"] > 0 and r["hf_matmul_s"] > 0, r
        assert r["megarlhf_matmul_s"] < r["megarlhf_profiled_call_s"] and r["hf_matmul_s"] < r["hf_profiled_call_s"], r
        assert r["ratio_bound"] > 0, r
    assert "compile=True" in out.stdout
    assert "ratio bound" in out.stdout
