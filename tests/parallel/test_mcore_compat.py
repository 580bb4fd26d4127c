"""What differs between Megatron-Core releases (parallel/compat.py) does not leak into
training: Megatron's process-wide inference flag (0.18+) left set by generation, and a
checkpoint written under megatron-core 0.16.1 resumed under the installed release."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megarlhf.checkpoint.dist_ckpt import load_checkpoint, resolve_checkpoint, save_checkpoint
from megarlhf.parallel import compat, weights
from megarlhf.rollout.engine import GenerationEngine
from megarlhf.rollout.sampling import SamplingParams
from tests.parallel import mcore_ckpt_writer as writer

REPO = Path(__file__).resolve().parents[2]
OLD_PYTHON_ENV = "MEGARLHF_MCORE_016_PYTHON"


def _set_flag_like_megatrons_engine() -> None:
    """What Megatron's StaticInferenceEngine does in its constructor (and never undoes)."""
    if compat.HAS_INFERENCE_MODE_FLAG:
        from megatron.core.inference.utils import InferenceMode

        InferenceMode.set_active()


def leak_case() -> dict:
    ref = writer.engine(seed=5)
    ref_stats = writer.step(ref, seed=3)
    ref_params = weights.gather_full_state(ref.module, ref.groups)

    eng = writer.engine(seed=5)
    seen = []
    hook = eng.module.register_forward_pre_hook(lambda m, a: seen.append(compat.inference_mode_active()))
    gen = GenerationEngine(eng.module, eng.groups, vocab_size=250, eos_id=1, pad_id=0)
    gen.generate([[5, 17, 33], [8, 9, 10, 11]], SamplingParams(max_new_tokens=4, temperature=0), seeds=[0, 1])
    hook.remove()
    after_generation = compat.inference_mode_active()

    hazard = None
    if compat.HAS_INFERENCE_MODE_FLAG:  # the hazard is real: without the guard, training fails
        _set_flag_like_megatrons_engine()
        guard, compat.leave_inference_mode = compat.leave_inference_mode, lambda: False
        try:
            writer.step(writer.engine(seed=6), seed=3)
            hazard = "no error"
        except AssertionError as err:
            hazard = str(err)
        finally:
            compat.leave_inference_mode = guard
    _set_flag_like_megatrons_engine()
    stats = writer.step(eng, seed=3)
    params = weights.gather_full_state(eng.module, eng.groups)
    return {
        "flag_during_generation": seen,
        "flag_after_generation": after_generation,
        "flag_after_training": compat.inference_mode_active(),
        "hazard": hazard,
        "nll": stats["nll"],
        "ref_nll": ref_stats["nll"],
        "max_param_diff": max((params[n] - ref_params[n]).abs().max().item() for n in ref_params),
        "training": eng.module.training,
    }


def test_inference_flag_does_not_leak_into_training(world2):
    """Generate at TP2 (and, on 0.18+, leave Megatron's inference flag set as its static
    engine does), then train: same loss and update as a model that never generated."""
    for res in world2.run(leak_case):
        assert res["flag_during_generation"], "the generation engine never ran the model"
        # 0.18+: generation runs under the flag (0.16/0.17 have none: the context decides).
        assert all(res["flag_during_generation"]) == compat.HAS_INFERENCE_MODE_FLAG, res
        assert not res["flag_after_generation"]
        assert not res["flag_after_training"]
        if compat.HAS_INFERENCE_MODE_FLAG:
            assert "gather TP logits" in res["hazard"], res["hazard"]
        assert res["training"]
        assert res["nll"] == res["ref_nll"]
        assert res["max_param_diff"] == 0.0


def resume_case(run_dir: str, new_dir: str) -> dict:
    eng = writer.engine(seed=99)  # another init: everything must come from the checkpoint
    state = load_checkpoint(run_dir, {"actor": eng})
    second = writer.step(eng, seed=2)
    save_checkpoint(new_dir, 2, {"actor": eng}, {}, keep=1)  # in this release's format
    return {"writer": state["writer"], "nll": second["nll"], "params": weights.gather_full_state(eng.module, eng.groups)}


@pytest.mark.skipif(not compat.COMMON_STATE_IN_TORCH_DIST, reason="reads a 0.16.1 checkpoint under megatron-core >= 0.17")
def test_checkpoint_from_megatron_core_0_16_resumes(world2, tmp_path):
    """A TP2 training checkpoint (model, optimizer, scheduler, RNG) written by
    megatron-core 0.16.1 resumes here: the next step equals the writer's own next step.
    The other way round 0.16.1 cannot read this release's checkpoints: it says so."""
    old_python = os.environ.get(OLD_PYTHON_ENV)
    if not old_python:
        if os.environ.get("CI"):
            pytest.fail(f"CI: set {OLD_PYTHON_ENV} to the megatron-core 0.16.1 Python (make test-312 does)")
        pytest.skip(f"set {OLD_PYTHON_ENV} to a Python with megatron-core 0.16.1")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    subprocess.run(
        [old_python, "-m", "tests.parallel.mcore_ckpt_writer", str(tmp_path)], cwd=REPO, env=env, check=True, timeout=600
    )
    expected = torch.load(tmp_path / "expected.pt", weights_only=False)
    assert expected["megatron_core"] == "0.16.1"
    for res in world2.run(resume_case, str(tmp_path), str(tmp_path / "new")):
        assert res["writer"] == "0.16.1"
        assert res["nll"] == pytest.approx(expected["nll"], rel=1e-6)
        diff = max((res["params"][n] - expected["params"][n]).abs().max().item() for n in expected["params"])
        assert diff < 1e-6, diff

    def format_error(python: str, run_dir: Path) -> str:
        role_dir = resolve_checkpoint(run_dir) / "actor"
        code = f"from megarlhf.parallel.compat import checkpoint_format_error as f; print(f({str(role_dir)!r}))"
        return subprocess.run([python, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout

    assert format_error(sys.executable, tmp_path).strip() == "None"  # this release reads both
    assert format_error(sys.executable, tmp_path / "new").strip() == "None"
    assert format_error(old_python, tmp_path).strip() == "None"
    assert "written by megatron-core >= 0.17" in format_error(old_python, tmp_path / "new")
