"""Published PPO step times of peer frameworks, reproduced on their own settings.

Layer: plan/ (pure Python). Each row models the peer's step as its code runs it, with
the same phase primitives and the same `Efficiency` as megarlhf's own plan; the three
fitted factors are fitted once over all rows (`fit`), never per row. Where a source is
silent the assumption is stated next to the value.

Sources
- NeMo-Aligner, docs/user-guide/rlhf.rst, "PPO Performance Results with TensorRT-LLM":
  Llama3 70B actor and Llama3 70B reward model, HelpSteer2 prompts, num_rollout_samples
  1024, global_batch_size 128, TRT-LLM reshard on, engine offloading off; H100 nodes of 8;
  actor + critic nodes 8+4, 16+8, 32+16, 64+32; tokens generated 350.7 / 323.3 / 331.7 /
  334; step 366.7 / 190.4 / 108 / 56.9 s; rollout_micro_batch_size 8 (16 at 64+32).
  Code read (NeMo-Aligner main): the actor generates rollout_micro_batch_size prompts at a
  time per TRT-LLM engine (static batches, nemo_aligner/utils/trt_llm.py) on TP-only
  replicas (reshard), sends each batch to the critic/RM server as it is done (futures),
  pads the whole rollout batch to its longest sequence (PPORolloutBatch), computes actor
  and initial-policy log-probs on the training layout, waits for rewards and values,
  then trains the actor while the critic server trains (in parallel) on its own nodes.
- OpenRLHF README (2024-05, "Performance"): Llama-2 70B PPO, 32 A800-80GB, 1024 prompts,
  1 PPO epoch: 4,488.53 s (optimized DeepSpeed-Chat: 10,407.0 s). The run's layout is not
  published; the repository's examples/scripts/train_ppo_llama_ray_70b.sh of that commit
  (391e1de) is taken doubled to 32 GPUs: actor 8 + critic 8 (ZeRO-3, Adam on CPU,
  gradient checkpointing), reference 4 + reward 4, 4 vLLM engines x TP2, micro rollout
  batch 2, micro train batch 1, train batch 128, prompt and generate max length 1024.
  Code read (openrlhf/trainer/ppo_utils/experience_maker.py, RemoteExperienceMaker): each
  actor rank sends its micro rollout batch to its vLLM engine, then runs the reference,
  reward and critic forward passes remotely and its own ZeRO-3 forward; the ZeRO-3 forward
  is collective, so the actor ranks advance in lock-step, micro batch by micro batch.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from megarlhf.plan.hardware import GPU, get_gpu
from megarlhf.plan.shapes import PRESETS, forward_flops, stage_parameters
from megarlhf.plan.timing import (
    Efficiency,
    allgather_seconds,
    allreduce_seconds,
    expected_max_length,
    generate_seconds,
    optimizer_seconds,
    pass_seconds,
)

# --- assumptions the sources do not state -----------------------------------------------
NEMO_PROMPT_TOKENS = 256
"""Mean HelpSteer2 prompt length in Llama-3 tokens (multi-turn prompts included): assumed."""
NEMO_MAX_RESPONSE = 2048
"""length_params.max_length: the config default encoder_seq_length / 2 (4096 / 2): assumed."""
NEMO_TP, NEMO_PP = 8, 4
"""Actor and critic training layouts (and TRT-LLM TP = 8 after resharding): assumed; the
docs give node counts only. PP 4 x TP 8 is the layout NeMo uses for 70B RM training."""
NEMO_CRITIC_PAD = 4096
"""remote_critic_rm.pad_to_length defaults to encoder_seq_length: the critic/RM server
scores every rollout batch padded to 4096 tokens (gpt_ppo_actor.yaml)."""
OPENRLHF_PROMPT_TOKENS = 256
"""Mean prompt length of the OpenOrca / HH-RLHF / OASST mixture: assumed, as for NeMo."""
OPENRLHF_MEAN_RESPONSE = 350
"""Mean response of Llama-2-70B-chat on that mixture: not published; assumed close to the
NeMo rows' measured 323-351 tokens."""
CPU_ADAM_PARAMS_PER_S = 1e9
"""DeepSpeed CPU-Adam throughput of one rank (its share of a node's cores): assumed."""


@dataclass(frozen=True)
class Row:
    """A published step time and the settings it was measured on."""

    name: str
    framework: str
    gpu: GPU
    gpus: int
    published_s: float
    settings: dict

    def predict(self, eff: Efficiency) -> dict[str, float]:
        return PREDICTORS[self.framework](self, eff)


def _nemo(row: Row, eff: Efficiency) -> dict[str, float]:
    s = row.settings
    cfg = PRESETS["llama3-70b"]
    gpu, n = row.gpu, s["rollouts"]
    actor_gpus, critic_gpus = s["actor_nodes"] * 8, s["critic_nodes"] * 8
    mbs, mean = s["rollout_micro_batch"], s["mean_response"]
    prompt = NEMO_PROMPT_TOKENS
    # Generation: TP-only TRT-LLM replicas, static batches of rollout_micro_batch_size.
    replicas = actor_gpus // NEMO_TP
    rounds = math.ceil(n / (replicas * mbs))
    gen, _ = generate_seconds(cfg, gpu, eff, tp=NEMO_TP, batch=mbs, rounds=rounds, prompt=prompt,
                              mean_response=mean, max_response=NEMO_MAX_RESPONSE)  # fmt: skip
    # The whole rollout batch is padded to its longest sequence for log-probs and training.
    seq = prompt + expected_max_length(mean, NEMO_MAX_RESPONSE, n)
    dp = actor_gpus // (NEMO_TP * NEMO_PP)
    tokens = n * seq
    logprob = 2 * pass_seconds(cfg, gpu, eff, tokens=tokens, seq=seq, gpus=actor_gpus, backward=False, pp=NEMO_PP,
                               microbatches=n // (dp * mbs))  # actor + initial policy  # fmt: skip
    # Critic/RM server: reward + value forward of every batch, padded to 4096, overlapped
    # with generation; what is left after generation and the log-probs is waited for.
    critic_infer = 2 * pass_seconds(cfg, gpu, eff, tokens=n * NEMO_CRITIC_PAD, seq=NEMO_CRITIC_PAD, gpus=critic_gpus,
                                    backward=False, head="value")  # fmt: skip
    wait = max(critic_infer / rounds, critic_infer - gen - logprob)

    def train(gpus: int, head: str) -> float:
        dp = gpus // (NEMO_TP * NEMO_PP)
        steps = n // s["global_batch"]
        compute = pass_seconds(cfg, gpu, eff, tokens=tokens, seq=seq, gpus=gpus, backward=True, pp=NEMO_PP,
                               microbatches=s["global_batch"] // dp, head=head)  # fmt: skip
        tp_comm = allreduce_seconds(tokens / dp * cfg.hidden_size * 2 * cfg.num_layers / NEMO_PP * 4, NEMO_TP,
                                    gpu.nvlink_bytes_per_s, eff)  # fmt: skip
        params = max(stage_parameters(cfg, NEMO_TP, NEMO_PP, head))
        bw = gpu.nvlink_bytes_per_s if NEMO_TP * dp <= 8 else gpu.network_bytes_per_s
        sync = allgather_seconds(params * 4, dp, bw, eff) + allgather_seconds(params * 2, dp, bw, eff)
        return compute + tp_comm + steps * (sync + optimizer_seconds(params / dp, gpu, eff))

    actor_params = max(stage_parameters(cfg, NEMO_TP, NEMO_PP))
    # offload_adam_states (actor default): Adam states to CPU for generation and back.
    adam_swap = 2 * actor_params * 12 / dp / (gpu.pcie_bytes_per_s * eff.comm)
    return {
        "generate": gen,
        "logprobs": logprob,
        "critic_wait": wait,
        "train": max(train(actor_gpus, "lm"), train(critic_gpus, "value")),
        "offload": adam_swap,
    }


def _zero3_pass(cfg, gpu: GPU, eff: Efficiency, *, rows: int, seq: float, group: int, backward: bool) -> float:
    """One ZeRO-3 microbatch on one rank: its own rows with all weights gathered layer by
    layer (prefetch overlaps the gathers with compute); backward gathers again and
    reduce-scatters the gradients; gradient checkpointing adds a forward."""
    flops = forward_flops(cfg, rows * seq, seq / 2) * (4 if backward else 1)
    compute = flops / (gpu.bf16_flops * eff.mfu)
    params_bytes = sum(stage_parameters(cfg, 1, 1)) * 2
    comm = (3 if backward else 1) * allgather_seconds(params_bytes, group, gpu.nvlink_bytes_per_s, eff)
    return max(compute, comm)


def _openrlhf(row: Row, eff: Efficiency) -> dict[str, float]:
    s = row.settings
    cfg = PRESETS["llama2-70b"]
    gpu, n = row.gpu, s["rollouts"]
    actors, mrb = s["actor_gpus"], s["micro_rollout_batch"]
    engines, vtp = s["vllm_engines"], s["vllm_tp"]
    prompt, mean, cap = OPENRLHF_PROMPT_TOKENS, OPENRLHF_MEAN_RESPONSE, s["generate_max_len"]
    # Lock-step rounds: every actor rank generates its micro rollout batch, then scores it.
    rounds = n // (actors * mrb)
    gen, _ = generate_seconds(cfg, gpu, eff, tp=vtp, batch=actors // engines * mrb, rounds=rounds, prompt=prompt,
                              mean_response=mean, max_response=cap, rows_waited=actors * mrb)  # fmt: skip
    seq = prompt + expected_max_length(mean, cap, mrb)  # a micro batch is padded to its longest row
    one = lambda group, rows=mrb: _zero3_pass(cfg, gpu, eff, rows=rows, seq=seq, group=group, backward=False)  # noqa: E731
    # Requests per round: reference and reward ranks serve actors / 4 actor ranks each.
    score = rounds * max(one(actors), one(s["critic_gpus"]),
                         actors // s["ref_gpus"] * one(s["ref_gpus"]), actors // s["reward_gpus"] * one(s["reward_gpus"]))  # fmt: skip
    # Training (actor and critic in parallel): micro train batch 1, n / gpus rows per rank.
    per_rank = n // actors
    steps = n // s["train_batch"]
    params = sum(stage_parameters(cfg, 1, 1))
    mb = _zero3_pass(cfg, gpu, eff, rows=1, seq=seq, group=actors, backward=True)
    adam = params / actors / CPU_ADAM_PARAMS_PER_S + 2 * params / actors * 2 / (gpu.pcie_bytes_per_s * eff.comm)
    train = per_rank * mb + steps * adam
    # Weights to the vLLM engines: broadcast from actor rank 0 over the network.
    refit = params * 2 / (gpu.network_bytes_per_s * eff.comm)
    return {"generate": gen, "score": score, "train": train, "refit": refit}


PREDICTORS = {"nemo-aligner": _nemo, "openrlhf": _openrlhf}

H100, A800 = get_gpu("H100"), get_gpu("A800")
ROWS = [
    Row(f"NeMo-Aligner 70B PPO, {a}+{c} H100 nodes", "nemo-aligner", H100, (a + c) * 8, t,
        {"actor_nodes": a, "critic_nodes": c, "rollouts": 1024, "global_batch": 128, "mean_response": m,
         "rollout_micro_batch": 16 if a == 64 else 8})
    for a, c, m, t in ((8, 4, 350.7, 366.7), (16, 8, 323.3, 190.4), (32, 16, 331.7, 108.0), (64, 32, 334.0, 56.9))
] + [
    Row("OpenRLHF 70B PPO, 32 A800", "openrlhf", A800, 32, 4488.53,
        {"rollouts": 1024, "train_batch": 128, "actor_gpus": 8, "critic_gpus": 8, "ref_gpus": 4, "reward_gpus": 4,
         "vllm_engines": 4, "vllm_tp": 2, "micro_rollout_batch": 2, "generate_max_len": 1024}),
]  # fmt: skip


def errors(eff: Efficiency, rows: list[Row] = ROWS) -> list[float]:
    """predicted / published - 1 for each row."""
    return [sum(r.predict(eff).values()) / r.published_s - 1 for r in rows]


def fit(rows: list[Row] = ROWS) -> Efficiency:
    """The fitted factors minimising the summed squared log error over all rows (a grid,
    then a finer grid around the best point)."""

    def loss(eff):
        return sum(math.log(1 + e) ** 2 for e in errors(eff, rows))

    grids = {"mfu": [0.2 + 0.05 * i for i in range(9)], "hbm": [0.4 + 0.05 * i for i in range(11)],
             "decode_step_s": [0.5e-3 * i for i in range(0, 21)]}  # fmt: skip
    best = min((replace(Efficiency(), mfu=m, hbm=h, decode_step_s=d) for m, h, d in itertools.product(*grids.values())),
               key=loss)  # fmt: skip
    fine = {"mfu": [best.mfu + 0.01 * i for i in range(-4, 5)], "hbm": [best.hbm + 0.01 * i for i in range(-4, 5)],
            "decode_step_s": [max(0.0, best.decode_step_s + 1e-4 * i) for i in range(-4, 5)]}  # fmt: skip
    best = min((replace(best, mfu=round(m, 3), hbm=round(h, 3), decode_step_s=round(d, 5))
                for m, h, d in itertools.product(*fine.values()) if 0 < m <= 1 and 0 < h <= 1), key=loss)  # fmt: skip
    return best


def leave_one_out(rows: list[Row] = ROWS) -> list[float]:
    """Each row's error when the factors are fitted on the other rows only: how well the
    model predicts a setting it was not fitted on."""
    out = []
    for i, row in enumerate(rows):
        eff = fit(rows[:i] + rows[i + 1 :])
        out.append(sum(row.predict(eff).values()) / row.published_s - 1)
    return out
