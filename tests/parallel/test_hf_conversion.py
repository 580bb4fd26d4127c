"""Hugging Face <-> megarlhf conversion, checked against transformers itself.

Tiny random models are built with transformers from configs (no downloads): Llama with
GQA (sharded safetensors + index), Qwen2 (q/k/v bias, tied embeddings), Mistral (sliding
window), a Llama reward model (LlamaForSequenceClassification), and a Llama with Llama
3.1's RoPE scaling (rope_type 'llama3'). Every weight, norms and biases included, is
redrawn so that no mapping error can hide behind a zero or a one.
- tools/convert_hf_to_megatron.py output loads at TP1, TP2, PP2 and TP2xPP2 and gives
  transformers' logits (float32, max abs diff printed);
- the trainers' path (`load_hf_weights`: each rank streams its own slice) does too, and
  a checkpoint it saves at TP2xPP2 exports back to exactly the original tensors, which
  transformers loads; a tied-embedding model's checkpoint round-trips at PP2;
- with llama3 RoPE scaling, the logits on 128-token sequences match at TP1 and TP2;
- a reward model scores the same in transformers' LlamaForSequenceClassification (last
  non-pad token) as in megarlhf, also once trained a few steps (TP2 / PP2); a checkpoint
  from when value heads had a bias exports only if that bias is exactly 0;
- bad inputs exit with code 2 and a message naming the tensor and both shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megarlhf.checkpoint.dist_ckpt import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint, save_model_weights
from megarlhf.checkpoint.hf import load_hf_weights, model_config_from_hf, read_hf_config
from megarlhf.config import ModelConfig, OptimConfig, load_config
from megarlhf.engine.engine import TrainEngine
from megarlhf.engine.schedule import run_microbatches
from megarlhf.models.backbone import build_model
from megarlhf.parallel.compat import MCORE_VERSION
from megarlhf.trainers.rm import sequence_scores
from tests.parallel.common import groups, reseed

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-4  # the bound for float32; measured differences are printed
PAD = 0
TOKENS = torch.randint(1, 250, (2, 16), generator=torch.Generator().manual_seed(0))
LENGTHS = torch.tensor([16, 11])  # the reward batch is right-padded with PAD

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=250, max_position_embeddings=64, rms_norm_eps=1e-5)  # fmt: skip
FAMILIES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True, rope_theta=1000000.0)
    ),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SHAPE, sliding_window=32)),
    "reward": lambda: transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**SHAPE, num_labels=1, pad_token_id=PAD)
    ),
}


def tool(name: str, *args, expect: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == expect, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def hf_output(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{family: (HF folder, converted megarlhf folder, transformers' logits on TOKENS)}."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (family, make) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        model = make().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
        src = root / family
        # The Llama policy as many small shards (model.safetensors.index.json).
        model.save_pretrained(src, max_shard_size="100KB" if family == "llama" else "1GB")
        tokens = TOKENS.clone()
        if family == "reward":
            tokens[1, LENGTHS[1] :] = PAD
        conv = tool("convert_hf_to_megatron.py", src, root / f"{family}-mg")
        # Megatron-Core's TE/Apex fallback warnings are filtered (megarlhf/output.py), and the
        # progress bar writes whole lines into a pipe.
        assert "Transformer Engine" not in conv.stderr and "Apex" not in conv.stderr, conv.stderr
        assert "\r" not in conv.stderr, conv.stderr
        out[family] = (src, root / f"{family}-mg", hf_output(model, tokens))
    assert (root / "llama" / "model.safetensors.index.json").is_file()
    return out


# Llama 3.1's RoPE scaling. Megatron-Core fixes low/high_freq_factor and the original
# length; the factor is free. On 8 frequencies (head_dim 16) with theta 5e5, 2 lie between
# the 2048- and 8192-token wavelengths (interpolated) and 2 above (divided by the factor):
# over 128 tokens that moves transformers' logits by ~0.08, far above ATOL.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # fmt: skip
LONG_TOKENS = torch.randint(1, 250, (2, 128), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory):
    """A Llama 3.1-style model (llama3 RoPE scaling), its HF folder and converted folder,
    transformers' logits on LONG_TOKENS with and without the scaling, and inv_freq."""
    root = tmp_path_factory.mktemp("llama3")
    shape = {**SHAPE, "max_position_embeddings": 16384}
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, rope_parameters=LLAMA3_ROPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(root / "hf")
    tool("convert_hf_to_megatron.py", root / "hf", root / "mg")
    plain_rope = {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]}
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, rope_parameters=plain_rope)).eval()
    plain.load_state_dict(model.state_dict())
    return {"hf": root / "hf", "mg": root / "mg", "logits": hf_output(model, LONG_TOKENS),
            "plain_logits": hf_output(plain, LONG_TOKENS), "inv_freq": model.model.rotary_emb.inv_freq,
            "plain_inv_freq": plain.model.rotary_emb.inv_freq}  # fmt: skip


# --- worker functions (run on every rank of a harness world) ------------------------------
def forward(model, g, tokens: torch.Tensor):
    """The model's output [B, T, V'] (LM, vocab gathered over TP) or [B, T, 1] on the last
    pipeline stage; None on the others."""
    b, t = tokens.shape
    mb = {"tokens": tokens, "position_ids": torch.arange(t).expand(b, t).contiguous()}

    def keep(output, mb):
        out = output.detach()
        if out.shape[-1] > 1 and g.layout.tp > 1:
            shards = [torch.empty_like(out) for _ in range(g.layout.tp)]
            dist.all_gather(shards, out.contiguous(), group=g.tp)
            out = torch.cat(shards, dim=-1)
        return output.sum() * 0, {"out": out}

    model.eval()
    stats = run_microbatches(model, g, [mb], keep, forward_only=True)
    return stats[0]["out"] if stats else None


def logits_diff(model, g, cfg: ModelConfig, reference: torch.Tensor, tokens: torch.Tensor = TOKENS):
    logits = forward(model, g, tokens)
    if logits is None:
        return None
    # The padded vocabulary rows are zero, so their logits are exactly 0.
    assert logits.shape[-1] == cfg.padded_vocab_size and not logits[..., cfg.vocab_size :].any()
    return (logits[..., : cfg.vocab_size] - reference).abs().max().item()


def from_checkpoint_case(mg_dir, tp, pp, reference):
    cfg = load_config(ModelConfig, Path(mg_dir) / "model_config.yaml")
    g = groups(tp, pp)
    reseed(11, g)
    model = build_model(cfg, g, "lm")
    load_model_weights(model, g, mg_dir, "actor")
    return logits_diff(model, g, cfg, reference)


def rope_scaling_case(mg_dir, tp, reference, tokens):
    """Logits against transformers' on long sequences, and the RoPE frequencies."""
    cfg = load_config(ModelConfig, Path(mg_dir) / "model_config.yaml")
    g = groups(tp, 1)
    reseed(11, g)
    model = build_model(cfg, g, "lm")
    load_model_weights(model, g, mg_dir, "actor")
    return logits_diff(model, g, cfg, reference, tokens), model.rotary_pos_emb.inv_freq


def from_hf_case(hf_dir, save_dir, tp, pp, reference):
    """The trainers' `init_from: hf:` path, then a weights-only save at this layout."""
    cfg = model_config_from_hf(read_hf_config(hf_dir)).config
    g = groups(tp, pp)
    reseed(12, g)
    model = build_model(cfg, g, "lm")
    load_hf_weights(model, g, hf_dir, strict=True)
    save_model_weights(model, g, save_dir, "actor", source=f"hf:{hf_dir}")
    return logits_diff(model, g, cfg, reference)


def reward_case(mg_dir, save_dir, tp, pp, steps=3):
    """Bradley-Terry steps from the converted reward model, then scores at the last
    non-pad token of the padded batch, and a weights-only save."""
    cfg = load_config(ModelConfig, Path(mg_dir) / "model_config.yaml")
    g = groups(tp, pp)
    reseed(13, g)
    model = build_model(cfg, g, "value")
    load_model_weights(model, g, mg_dir, "reward")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = torch.randint(1, 250, (4, 16), generator=torch.Generator().manual_seed(1))  # 2 chosen, 2 rejected
    mb = {"tokens": pairs, "position_ids": torch.arange(16).expand(4, 16).contiguous(),
          "last_index": torch.tensor([15, 12, 15, 9])}  # fmt: skip

    def bt_loss(output, mb):
        scores = sequence_scores(output[..., 0].float(), mb["last_index"])
        loss = -torch.nn.functional.logsigmoid(scores[:2] - scores[2:]).sum() / 2
        return loss, {"loss": loss.detach()}

    if steps:
        engine = TrainEngine(model, g, OptimConfig(learning_rate=1e-2, lr_scheduler_type="constant"), steps)
        for _ in range(steps):
            engine.train_step([mb], bt_loss)
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters())
    tokens = TOKENS.clone()
    tokens[1, LENGTHS[1] :] = PAD
    values = forward(model, g, tokens)
    save_model_weights(model, g, save_dir, "reward", step=steps)
    if values is None:
        return None
    return {"scores": sequence_scores(values[..., 0], LENGTHS - 1), "moved": moved}


# --- tests --------------------------------------------------------------------------------
FAMILY_NAMES = ["llama", "qwen2", "mistral"]
LAYOUTS_2 = [pytest.param(1, 1, id="tp1"), pytest.param(2, 1, id="tp2"), pytest.param(1, 2, id="pp2")]


def _max(diffs) -> float:
    return max(d for d in diffs if d is not None)


@pytest.mark.parametrize("tp,pp", LAYOUTS_2)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_converted_checkpoint_gives_transformers_logits(world2, hf_models, family, tp, pp):
    _, mg_dir, reference = hf_models[family]
    diff = _max(world2.run(from_checkpoint_case, str(mg_dir), tp, pp, reference))
    print(f"{family} tp{tp} pp{pp}: max |logits - transformers| = {diff:.2e}")
    assert diff <= ATOL


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_converted_checkpoint_tp2_pp2(world4, hf_models, family):
    _, mg_dir, reference = hf_models[family]
    diff = _max(world4.run(from_checkpoint_case, str(mg_dir), 2, 2, reference))
    print(f"{family} tp2 pp2: max |logits - transformers| = {diff:.2e}")
    assert diff <= ATOL


def test_llama3_rope_scaling_gives_transformers_logits(world2, llama3_model, tmp_path):
    ref = llama3_model
    changed = ref["inv_freq"] != ref["plain_inv_freq"]
    assert changed.sum() == 4, ref["inv_freq"]  # the scaling matters on these sequences:
    assert (ref["logits"] - ref["plain_logits"]).abs().max() > 100 * ATOL
    for tp in (1, 2):
        results = world2.run(rope_scaling_case, str(ref["mg"]), tp, ref["logits"], LONG_TOKENS)
        diff = _max(d for d, _ in results)
        print(f"llama3 rope scaling tp{tp}: max |logits - transformers| = {diff:.2e}")
        assert diff <= ATOL
        for _, inv_freq in results:
            torch.testing.assert_close(inv_freq, ref["inv_freq"], rtol=1e-6, atol=0)
    # ... and back: config.json carries the scaling, transformers gives the same logits.
    tool("convert_megatron_to_hf.py", ref["mg"], tmp_path / "back")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    assert torch.equal(hf_output(loaded, LONG_TOKENS), ref["logits"])


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_hf_init_at_tp2_pp2_and_exact_round_trip(world4, hf_models, tmp_path, family):
    """HF -> (each rank streams its slice) TP2xPP2 -> dist checkpoint -> HF: every tensor
    equal, and transformers loads the result and gives the original logits."""
    src, _, reference = hf_models[family]
    diff = _max(world4.run(from_hf_case, str(src), str(tmp_path / "mg"), 2, 2, reference))
    print(f"{family} hf:-init tp2 pp2: max |logits - transformers| = {diff:.2e}")
    assert diff <= ATOL

    tool("convert_megatron_to_hf.py", tmp_path / "mg", tmp_path / "back", "--hf-template", src)
    assert_same_tensors(read_safetensors(src), read_safetensors(tmp_path / "back"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(loaded).__name__ == f"{family.capitalize()}ForCausalLM"
    assert torch.equal(hf_output(loaded, TOKENS), reference)


def test_round_trip_from_converter_output_keeps_shards_and_files(hf_models, tmp_path):
    """The converter's own folder (model_config.yaml, hf/ template) exports unaided."""
    src, mg_dir, reference = hf_models["llama"]
    tool("convert_megatron_to_hf.py", mg_dir, tmp_path / "back", "--max-shard-size", "0.0002")
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "back" / "generation_config.json").is_file()
    assert_same_tensors(read_safetensors(src), read_safetensors(tmp_path / "back"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert torch.equal(hf_output(loaded, TOKENS), reference)


@pytest.mark.parametrize("tp,pp", [pytest.param(2, 1, id="tp2"), pytest.param(1, 2, id="pp2")])
def test_trained_reward_model_scores_the_same_in_transformers(world2, hf_models, tmp_path, tp, pp):
    src, mg_dir, hf_logits = hf_models["reward"]
    # The converted (untrained) model first: megarlhf scores == transformers' scores.
    results = [r for r in world2.run(reward_case, str(mg_dir), str(tmp_path / "rm0"), tp, pp, 0) if r]
    assert (results[0]["scores"] - hf_logits[:, 0]).abs().max() <= ATOL

    results = [r for r in world2.run(reward_case, str(mg_dir), str(tmp_path / "rm"), tp, pp) if r]
    ours = results[0]
    assert ours["moved"] > 1e-3  # it trained
    tool("convert_megatron_to_hf.py", tmp_path / "rm", tmp_path / "rm-hf", "--hf-template", src, "--pad-token-id", PAD)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm-hf").eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    tokens = TOKENS.clone()
    tokens[1, LENGTHS[1] :] = PAD
    diff = (hf_output(model, tokens)[:, 0] - ours["scores"]).abs().max().item()
    print(f"reward tp{tp} pp{pp}: max |score - transformers| = {diff:.2e}")
    assert diff <= ATOL


def legacy_bias_case(mg_dir, save_dir, bias):
    """A reward model saved the way value heads were before they lost their bias."""
    cfg = load_config(ModelConfig, Path(mg_dir) / "model_config.yaml")
    g = groups(1, 1)
    reseed(15, g)
    model = build_model(cfg, g, "value")
    load_model_weights(model, g, mg_dir, "reward")
    model.output_layer.bias = torch.nn.Parameter(torch.tensor([bias]))  # saved via its state_dict
    save_model_weights(model, g, save_dir, "reward")


@pytest.mark.parametrize("bias", [0.0, 0.25])
def test_legacy_value_head_bias_exports_only_when_zero(world2, hf_models, tmp_path, bias):
    src, mg_dir, hf_logits = hf_models["reward"]
    world2.run(legacy_bias_case, str(mg_dir), str(tmp_path / "old"), bias)
    args = (tmp_path / "old", tmp_path / "old-hf", "--hf-template", src, "--pad-token-id", PAD)
    if bias:
        out = tool("convert_megatron_to_hf.py", *args, expect=2)
        assert "output_layer.bias = [0.25]" in out.stderr and "--drop-score-bias" in out.stderr
        assert not (tmp_path / "old-hf" / "model.safetensors").exists()
        return
    out = tool("convert_megatron_to_hf.py", *args)
    assert "all-zero output_layer.bias" in out.stdout
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "old-hf").eval()
    tokens = TOKENS.clone()
    tokens[1, LENGTHS[1] :] = PAD
    assert (hf_output(model, tokens) - hf_logits).abs().max() <= ATOL


def test_shape_mismatch_and_unsupported_architecture_exit_2(hf_models, tmp_path):
    import json

    from safetensors.torch import save_file

    src = hf_models["qwen2"][0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    state = read_safetensors(src)
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:96].clone()
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    out = tool("convert_hf_to_megatron.py", bad, tmp_path / "out", expect=2)
    assert "model.layers.1.mlp.up_proj.weight" in out.stderr and "(96, 64)" in out.stderr and "(128, 64)" in out.stderr

    config = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    out = tool("convert_hf_to_megatron.py", bad, tmp_path / "out", expect=2)
    assert "GPTNeoXForCausalLM" in out.stderr and "not supported" in out.stderr


def tied_pp_round_trip_case(mg_dir, run_dir):
    """Qwen2 (tied embeddings) at PP2 x DP2, where the last stage holds a copy of the
    embedding as its output layer: one training step (which must keep the copy in sync),
    a training checkpoint (model + optimizer), then the logits of fresh models that load it
    at PP2 (weights only, and a full resume) and at TP2, and of a fresh model before
    loading (to show that the loads changed something)."""
    cfg = load_config(ModelConfig, Path(mg_dir) / "model_config.yaml")
    g = groups(1, 2)
    reseed(14, g)
    engine = TrainEngine(build_model(cfg, g, "lm"), g, OptimConfig(learning_rate=1e-2), max_steps=1)
    load_model_weights(engine.module, g, mg_dir, "actor")
    mb = {"tokens": TOKENS, "position_ids": torch.arange(TOKENS.shape[1]).expand_as(TOKENS).contiguous()}
    engine.train_step([mb], lambda output, mb: (output.float().square().mean(), {}))
    out = {"saved": forward(engine.module, g, TOKENS)}
    save_checkpoint(run_dir, 1, {"actor": engine}, {}, keep=1)

    reseed(15, g)
    resumed = TrainEngine(build_model(cfg, g, "lm"), g, OptimConfig(learning_rate=1e-2), max_steps=1)
    out["fresh"] = forward(resumed.module, g, TOKENS)
    load_checkpoint(run_dir, {"actor": resumed})
    out["resumed pp2"] = forward(resumed.module, g, TOKENS)
    # a resume under another learning rate: 0.19 matches optimizer groups by their settings and
    # refuses (megarlhf names the fix); earlier releases load it and keep the checkpoint's schedule
    other = TrainEngine(build_model(cfg, g, "lm"), g, OptimConfig(learning_rate=1e-4), max_steps=1)
    try:
        load_checkpoint(run_dir, {"actor": other})
        out["other lr"] = "loaded"
    except CheckpointError as err:
        out["other lr"] = str(err)
    for tp, pp in ((1, 2), (2, 1)):
        g = groups(tp, pp)
        reseed(16, g)
        model = build_model(cfg, g, "lm")
        load_model_weights(model, g, run_dir, "actor")
        out[f"weights tp{tp} pp{pp}"] = forward(model, g, TOKENS)
    return out


def test_tied_embeddings_checkpoint_round_trip_at_pp2(world4, hf_models, tmp_path):
    """Megatron-Core 0.16.1 asks parallel_state (which megarlhf leaves uninitialised) for
    the DP rank of a tied output layer at PP > 1; checkpoint/dist_ckpt.py answers it with
    the role's ranks (parallel/layout.py: parallel_state_ranks)."""
    results = world4.run(tied_pp_round_trip_case, str(hf_models["qwen2"][1]), str(tmp_path / "run"))
    for r in results:
        if MCORE_VERSION >= (0, 19, 0):
            assert "settings" in r["other lr"] and "init_from=" in r["other lr"], r["other lr"]
        else:
            assert r["other lr"] == "loaded"
    last = [r for r in results if r["saved"] is not None]  # the last-stage ranks (DP2)
    assert len(last) == 2
    for r in last:
        assert (r["fresh"] - r["saved"]).abs().max() > 1e-2  # a fresh model differs
        for name in ("resumed pp2", "weights tp1 pp2", "weights tp2 pp1"):
            diff = (r[name] - r["saved"]).abs().max().item()
            print(f"qwen2 (tied) saved at pp2: {name}: max |logits - saved| = {diff:.2e}")
            assert diff <= 1e-5, name
