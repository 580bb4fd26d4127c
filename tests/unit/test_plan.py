"""The planner (megarlhf/plan/): parameter counts vs built models, memory terms by hand,
activation bytes vs what autograd saves, length statistics vs Monte Carlo, the
calibration fit, the layout search and the CLI's exit codes."""

import math
import random

import pytest

from megarlhf.config import ConfigError, ModelConfig
from megarlhf.plan import memory, peers
from megarlhf.plan.command import main as plan_main
from megarlhf.plan.hardware import GIB, get_gpu
from megarlhf.plan.planner import Cluster, Layouts, RoleLayout, Workload, parse_layout, plan, search
from megarlhf.plan.shapes import PRESETS, load_shape, stage_parameters
from megarlhf.plan.timing import Efficiency, decode_step_seconds, expected_max_length, LENGTH_SHAPE

SMALL = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=192,
                    vocab_size=300, max_seq_length=64)  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gpt"])
@pytest.mark.parametrize("head", ["lm", "value"])
@pytest.mark.parametrize("tie", [False, True])
def test_rank_parameters_equal_a_built_model(single_rank, arch, head, tie):
    from megarlhf.models.backbone import build_model

    cfg = ModelConfig(arch=arch, num_query_groups=2 if arch == "llama" else None, tie_embeddings=tie,
                      add_qkv_bias=arch == "llama")  # fmt: skip
    model = build_model(cfg, single_rank, head)
    assert stage_parameters(cfg, 1, 1, head) == [sum(p.numel() for p in model.parameters())]


def test_rank_parameters_by_hand_at_tp2_pp2():
    h, f, kv, v = 64, 192, 32, 384  # kv = head_dim 16 x 2 groups; vocab 300 padded to 384
    layer = (h * (h + 2 * kv) + h * h + 3 * h * f) // 2 + 2 * h  # matmuls split over TP, 2 norms replicated
    first = 2 * layer + v * h // 2
    last = 2 * layer + h + v * h // 2  # final norm + output layer shard
    assert stage_parameters(SMALL, 2, 2) == [first, last]
    assert sum(stage_parameters(SMALL, 1, 2)) == SMALL.num_parameters()


def test_model_states_by_hand():
    p = stage_parameters(SMALL, 1, 1)[0]
    fp32 = memory.model_states(SMALL, 1, 1, 1, trainable=True)
    assert (fp32.weights, fp32.grads, fp32.optimizer) == (4 * p, 4 * p, 8 * p)
    bf16 = ModelConfig(**{**SMALL.__dict__, "params_dtype": "bfloat16"})
    st = memory.model_states(bf16, 1, 1, 4, trainable=True, distributed_optimizer=True)
    assert (st.weights, st.grads, st.optimizer) == (2 * p, 4 * p, 12 * p / 4)
    assert memory.model_states(bf16, 1, 1, 4, trainable=False).total == 2 * p


def test_activation_terms_by_hand():
    # gpu impl, tp 2, no SP: 4h + ((h + 2kv) + (h + kv) + h + 3f) / 2 elements per token and layer
    h, kv, f = 64, 32, 192
    assert memory.layer_activation_elements(SMALL, 2) == 4 * h + ((h + 2 * kv) + (h + kv) + h + 3 * f) / 2
    assert memory.layer_activation_elements(SMALL, 2, sequence_parallel=True) == (4 * h + (h + 2 * kv) + (h + kv) + h + 3 * f) / 2
    bf16 = ModelConfig(**{**SMALL.__dict__, "params_dtype": "bfloat16"})
    per_layer = memory.layer_activation_elements(bf16, 1) * 8 * 32 * 2  # one layer, [8, 32] tokens, bf16
    act = memory.training_activations(bf16, 1, 2, micro_batch=8, seq=32, microbatches=8, head="value")
    assert (act.layers, act.head) == (2 * 2 * per_layer, 0)  # first stage: pp=2 microbatches in flight x 2 layers
    lm = memory.training_activations(bf16, 1, 2, micro_batch=8, seq=32, microbatches=8)
    loss = memory.LOSS_HEAD_FP32_COPIES * 8 * 32 * 384 * 4  # fp32 copies of [tokens, padded vocab]
    assert (lm.layers, lm.head) == (2 * per_layer, 2 * h * 8 * 32 * 2 + loss)  # the last stage holds more here
    full = memory.training_activations(bf16, 1, 1, micro_batch=8, seq=32, microbatches=1, recompute="full")
    assert full.layers == 4 * h * 8 * 32 * 2 + per_layer  # every layer's input + one rebuilt layer


@pytest.mark.parametrize("kv_groups", [4, 2])
def test_cpu_layer_activations_equal_what_autograd_saves(single_rank, kv_groups):
    """Bytes saved for backward by one more layer (L=2 minus L=1), tensors counted once
    by storage, parameters excluded, vs the planner's per-layer count (impl='cpu')."""
    import torch

    from megarlhf.models.backbone import build_model

    def saved_bytes(layers: int, b: int = 2, s: int = 64) -> int:
        cfg = ModelConfig(num_layers=layers, hidden_size=128, num_attention_heads=4, num_query_groups=kv_groups,
                          ffn_hidden_size=256, vocab_size=256, max_seq_length=s)  # fmt: skip
        model = build_model(cfg, single_rank, "lm")
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randint(0, 256, (b, s)), torch.arange(s).expand(b, s), None)
        return sum(seen.values()), cfg, b * s

    one, cfg, tokens = saved_bytes(1)
    two, _, _ = saved_bytes(2)
    predicted = memory.layer_activation_elements(cfg, 1, impl="cpu") * tokens * 4
    assert (two - one) == pytest.approx(predicted, rel=0.03)


def _erlang_sample(rng, scale):
    return sum(rng.expovariate(1 / scale) for _ in range(LENGTH_SHAPE))


def test_expected_max_length_matches_monte_carlo():
    from megarlhf.plan.timing import _scale_for_mean

    mean, cap, n = 300.0, 1024, 16
    scale = _scale_for_mean(mean, cap)
    rng = random.Random(0)
    draws = [[min(_erlang_sample(rng, scale), cap) for _ in range(n)] for _ in range(4000)]
    assert sum(min(x, cap) for d in draws for x in d) / (4000 * n) == pytest.approx(mean, rel=0.02)
    assert expected_max_length(mean, cap, n) == pytest.approx(sum(max(d) for d in draws) / 4000, rel=0.02)
    assert expected_max_length(mean, cap, 1) == mean
    assert expected_max_length(mean, cap, 8) < expected_max_length(mean, cap, 64) < cap
    assert expected_max_length(cap, cap, 8) == cap


def test_decode_step_by_hand():
    cfg, gpu, eff = PRESETS["llama3-70b"], get_gpu("H100"), Efficiency()
    weights = stage_parameters(cfg, 8, 1)[0] * 2
    kv = 8 * 1000 * 2 * 80 * 1 * 128 * 2  # 8 rows x 1000 tokens x K and V x layers x 1 group per rank x head dim x bf16
    expected = (weights + kv) / (gpu.hbm_bytes_per_s * eff.hbm) + eff.decode_step_s + 2 * 80 * eff.latency_s
    assert decode_step_seconds(cfg, gpu, eff, tp=8, batch=8, context=1000) == pytest.approx(expected)


def test_calibration_fit_reproduces_the_defaults_and_every_row_is_within_20_percent():
    fitted = peers.fit()
    for name in Efficiency.FITTED:
        assert getattr(fitted, name) == pytest.approx(getattr(Efficiency(), name))
    for row, err in zip(peers.ROWS, peers.errors(Efficiency())):
        assert abs(err) < 0.20, (row.name, err)


def test_parse_layout_forms():
    assert parse_layout("tp8-pp4") == parse_layout("tp8pp4") == parse_layout("tp=8,pp=4") == parse_layout("8x4")
    assert parse_layout("tp2") == RoleLayout(2, 1)
    for bad in ("tq8", "tp", "8x", "tp8-zz2", "tp0"):
        with pytest.raises(ConfigError):
            parse_layout(bad)


def test_plan_memory_adds_up_and_search_picks_the_fastest_fitting():
    cfg = PRESETS["llama3-8b"]
    cluster = Cluster(get_gpu("H100"), 1)
    work = Workload(rollout_batch=64, global_batch=32, response_length=512, max_prompt_length=512)
    layouts = Layouts(RoleLayout(2), RoleLayout(2), RoleLayout(2), RoleLayout(2), 2)
    p = plan(cfg, cfg, cluster, work, layouts, Efficiency())
    a, c = p.memory["actor"], p.memory["critic"]
    weights = sum(m["weights"] for m in p.memory.values())
    train = weights + a["grads"] + a["optimizer"] + c["grads"] + c["optimizer"] + max(a["activations"], c["activations"]) * 1.1
    assert p.phase_memory["train"] == pytest.approx(train + memory.RUNTIME_OVERHEAD_BYTES)
    found = search(cfg, cfg, cluster, work, Efficiency(), top=3)
    assert all(q.fits for q in found)
    assert [q.seconds for q in found] == sorted(q.seconds for q in found)


def test_search_refuses_batches_no_layout_splits():
    with pytest.raises(ConfigError, match="no layout"):
        search(PRESETS["llama3-8b"], PRESETS["llama3-8b"], Cluster(get_gpu("H100"), 3),
               Workload(rollout_batch=64, global_batch=64), Efficiency())  # fmt: skip


def test_load_shape_from_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  num_layers: 3\n  hidden_size: 96\n  num_attention_heads: 4\n")
    assert load_shape(str(path)).num_layers == 3
    assert load_shape("Llama3-70B").num_layers == 80


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt5"], "not a preset"),
    (["--gpu", "V100"], "unknown GPU"),
    (["--nodes", "1", "--gpus-per-node", "6", "--actor", "tp4"], "does not divide the 6 GPUs"),
    (["--model", "llama3-8b", "--nodes", "3", "--actor", "tp8-pp3"], "not divisible by pp = 3"),
    (["--model", "llama3-8b", "--nodes", "1", "--actor", "tp1", "--rollout-batch", "100", "--global-batch", "50"],
     "does not split"),
    (["--actor", "tp8-xx"], "expected tp<N>"),
])  # fmt: skip
def test_cli_bad_input_exits_2(capsys, argv, message):
    assert plan_main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_json(capsys):
    import json

    assert plan_main(["--model", "llama3-8b", "--nodes", "1", "--actor", "tp2", "--generation-tp", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    p = out["plans"][0]
    assert set(p["phase_peak_gib"]) == {"generate", "score", "train"} and p["seconds_per_iteration"] > 0
    assert p["capacity_gib"] == pytest.approx(get_gpu("H100").memory_bytes / GIB, abs=0.01)
    assert math.isclose(sum(p["seconds"].values()), p["seconds_per_iteration"], rel_tol=1e-3)


def test_load_shape_from_a_hugging_face_folder(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    }))  # fmt: skip
    cfg = load_shape(str(tmp_path))
    assert (cfg.num_layers, cfg.query_groups, cfg.add_qkv_bias, cfg.params_dtype) == (3, 2, True, "bfloat16")


def test_cli_without_critic_plans_three_roles(capsys):
    import json

    argv = ["--model", "llama3-8b", "--nodes", "1", "--no-critic", "--json", "--top", "1"]
    assert plan_main(argv) == 0
    p = json.loads(capsys.readouterr().out)["plans"][0]
    assert set(p["memory_gib_per_gpu"]) == {"actor", "reference", "reward", "engine"}
    assert "critic" not in p["layout"]


def test_generation_is_the_device_decode_model_alone():
    """The engine samples on the GPU inside its decode step: the generate phase is
    prefill + decode steps at the fitted step cost, nothing per row on the host."""
    from megarlhf.plan.timing import generate_seconds

    cfg, cluster, eff = PRESETS["llama3-8b"], Cluster(get_gpu("H100"), 1), Efficiency()
    work = Workload(rollout_batch=64, global_batch=32, response_length=512, max_prompt_length=512)
    p = plan(cfg, cfg, cluster, work, Layouts(RoleLayout(2), RoleLayout(2), RoleLayout(2), RoleLayout(2), 2), eff)
    expected, _ = generate_seconds(cfg, cluster.gpu, eff, tp=2, batch=64 // 4, rounds=1, prompt=work.min_prompt_length,
                                   mean_response=work.mean_response, max_response=work.response_length,
                                   extra_steps=work.max_prompt_length - work.min_prompt_length)  # fmt: skip
    assert p.phases["generate"] == pytest.approx(expected)


def test_forward_micro_batch_sizes_the_scoring_pass():
    """Scoring with forward_micro_batch rows: its transient memory scales with them (PP1),
    and under PP the planner uses the even split the trainers use (rows 64 / 2 dp = 32)."""
    from megarlhf.plan.planner import role_cost

    cfg = PRESETS["llama3-8b"]
    cluster = Cluster(get_gpu("H100"), 1)
    base = dict(rollout_batch=64, global_batch=32, response_length=512, max_prompt_length=512)

    def score_memory(layout, **kw):
        return role_cost(cfg, layout, "lm", False, cluster, Workload(**base, **kw), Efficiency(), "reference").score_activations

    one = score_memory(RoleLayout(4))
    assert score_memory(RoleLayout(4), forward_micro_batch=4) == pytest.approx(4 * one)
    assert score_memory(RoleLayout(2, 2), forward_micro_batch=12) == pytest.approx(
        score_memory(RoleLayout(2, 2), forward_micro_batch=8)  # 32 rows: 8 is the largest even split <= 12
    )
