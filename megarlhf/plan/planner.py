"""megarlhf's own PPO/GRPO iteration on a cluster: per-GPU memory by phase, seconds by
phase, and a search over layouts. Layer: plan/ (pure Python).

What is modelled is what megarlhf runs (trainers/ppo.py, trainers/rollout.py): the four
roles colocated on every GPU and time-sliced; one iteration =
  generate   the rollout engine (TP-only, `generation_tp`) decodes each replica's share
             of the prompts as ONE static batch: prefill to the shortest prompt, one step
             per position after it, until the longest response ends; the engine
             samples every row on the GPU in one step (within the decode step's
             fixed cost, timing.Efficiency.decode_step_s);
  score      forward passes of reward, reference, actor and critic at their layouts;
  train      epochs x minibatches of an actor and a critic optimizer step (Megatron DDP,
             gradients reduced after the last microbatch, not overlapped);
  refit      the engine's TP-only copy refreshed from a PP actor (free when it shares
             the actor's weights);
  offload    optimizer states / frozen weights over PCIe when the offload flags are set.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace

from megarlhf.config import ModelConfig
from megarlhf.config.errors import ConfigError
from megarlhf.config.train import forward_microbatch_rows
from megarlhf.plan import memory as mem
from megarlhf.plan.hardware import GPU
from megarlhf.plan.shapes import stage_parameters
from megarlhf.plan.timing import (
    Efficiency,
    allgather_seconds,
    allreduce_seconds,
    expected_max_length,
    generate_seconds,
    link_bytes_per_s,
    optimizer_seconds,
    pass_seconds,
)

RECOMPUTE = ("none", "selective", "full")

@dataclass(frozen=True)
class RoleLayout:
    """One role's split; dp follows from the GPU count."""

    tp: int = 1
    pp: int = 1
    distributed_optimizer: bool = True
    """Trainable roles: shard Adam states over DP (ZeRO-1)."""
    recompute: str = "none"
    """Trainable roles: 'none', 'selective' (core attention) or 'full' (every layer)."""
    sequence_parallel: bool = False

    def dp(self, world: int) -> int:
        return world // (self.tp * self.pp)

    def __str__(self) -> str:
        return f"tp{self.tp}-pp{self.pp}"


_LAYOUT_FORMS = (
    re.compile(r"^(?P<tp>\d+)x(?P<pp>\d+)$"),
    re.compile(r"^tp=?(?P<tp>\d+)(?:[-_,]?pp=?(?P<pp>\d+))?$"),
)


def parse_layout(text: str, **kwargs) -> RoleLayout:
    """'tp8', 'tp8-pp4', 'tp8pp4', 'tp=8,pp=4' or '8x4' -> RoleLayout."""
    s = text.lower().replace(" ", "")
    for form in _LAYOUT_FORMS:
        m = form.match(s)
        if m and int(m["tp"]) >= 1 and int(m["pp"] or 1) >= 1:
            return RoleLayout(int(m["tp"]), int(m["pp"] or 1), **kwargs)
    raise ConfigError(f"layout {text!r}: expected tp<N>[-pp<M>] (e.g. tp8-pp4) or <tp>x<pp> (e.g. 8x4)")


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    nodes: int
    gpus_per_node: int = 8

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(f"nodes = {self.nodes}, gpus_per_node = {self.gpus_per_node}: must be >= 1")


@dataclass(frozen=True)
class Workload:
    """One RL iteration's sizes."""

    rollout_batch: int = 1024
    """Sequences generated per iteration (train.global_batch_size of megarlhf ppo)."""
    global_batch: int = 128
    """Sequences per optimizer step (the PPO minibatch)."""
    ppo_epochs: int = 1
    micro_batch: int = 1
    """Sequences per forward/backward (train.micro_batch_size)."""
    forward_micro_batch: int = 0
    """Sequences per forward-only scoring pass (train.forward_micro_batch_size; 0 = micro_batch)."""
    prompt_length: float = 256
    """Mean prompt tokens."""
    max_prompt_length: int = 1024
    """Longest prompt (data.max_length): sizes the KV cache."""
    min_prompt_length: int = 32
    """Shortest prompt in a generation batch: the engine prefills up to it and feeds the
    rest of each prompt one position per step."""
    response_length: int = 1024
    """Most tokens generated per response (generation.response_length)."""
    mean_response_length: float = 0.0
    """Mean generated tokens (0 = half of response_length)."""
    critic: bool = True
    """PPO has a critic; GRPO-style training has none."""

    def __post_init__(self):
        if self.rollout_batch % self.global_batch:
            raise ConfigError(
                f"rollout batch {self.rollout_batch} does not split into minibatches of {self.global_batch}"
            )
        if not 0 < self.min_prompt_length <= self.prompt_length <= self.max_prompt_length:
            raise ConfigError("need 0 < min_prompt_length <= prompt_length <= max_prompt_length")

    @property
    def mean_response(self) -> float:
        return self.mean_response_length or self.response_length / 2

    @property
    def minibatches(self) -> int:
        return self.ppo_epochs * self.rollout_batch // self.global_batch


@dataclass(frozen=True)
class Layouts:
    """Everything the search varies."""

    actor: RoleLayout
    critic: RoleLayout | None
    """None without a critic (GRPO-style)."""
    reference: RoleLayout
    reward: RoleLayout
    generation_tp: int
    offload_optimizer: bool = False
    offload_frozen: bool = False

    def describe(self) -> str:
        a = self.actor
        flags = [f"recompute={a.recompute}"] if a.recompute != "none" else []
        flags += ["seq-parallel"] if a.sequence_parallel and a.tp > 1 else []
        flags += ["dist-opt"] if a.distributed_optimizer else []
        flags += [n for n, on in (("offload-optimizer", self.offload_optimizer), ("offload-frozen", self.offload_frozen)) if on]
        critic = f", critic {self.critic}" if self.critic else ""
        return (
            f"actor {a}{critic}, ref {self.reference}, reward {self.reward}, gen tp{self.generation_tp}"
            + (f" ({', '.join(flags)})" if flags else "")
        )


@dataclass
class Plan:
    layouts: Layouts
    memory: dict[str, dict[str, float]]
    """Per role: weights / grads / optimizer / activations / kv_cache bytes per GPU."""
    phase_memory: dict[str, float]
    """Peak bytes per GPU in each phase (generate, score, train), overhead included."""
    capacity: float
    phases: dict[str, float]
    """Seconds per phase of one iteration."""
    notes: list[str] = field(default_factory=list)

    @property
    def peak_memory(self) -> float:
        return max(self.phase_memory.values())

    @property
    def fits(self) -> bool:
        return self.peak_memory <= self.capacity

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


def check_layout(cfg: ModelConfig, layout: RoleLayout, world: int, role: str) -> None:
    """ConfigError naming the role and the number that does not divide."""
    if world % (layout.tp * layout.pp):
        raise ConfigError(
            f"{role} layout {layout}: tp*pp = {layout.tp * layout.pp} does not divide the {world} GPUs"
        )
    if layout.recompute not in RECOMPUTE:
        raise ConfigError(f"{role}: recompute {layout.recompute!r}, expected one of {RECOMPUTE}")
    for value, what in ((cfg.num_attention_heads, "attention heads"), (cfg.query_groups, "query groups"),
                        (cfg.ffn_size, "ffn size"), (cfg.padded_vocab_size, "padded vocabulary")):  # fmt: skip
        if value % layout.tp:
            raise ConfigError(f"{role} layout {layout}: {what} = {value} is not divisible by tp = {layout.tp}")
    if cfg.num_layers % layout.pp:
        raise ConfigError(f"{role} layout {layout}: {cfg.num_layers} layers are not divisible by pp = {layout.pp}")


def _row_length(work: Workload, pp: int, rows_sharing_shape: int) -> float:
    """Mean tokens a row is computed on. Without PP each microbatch is cut to its own
    longest row (rows grouped by length: ~no padding); under PP every microbatch of a step
    has one shape, that of the longest row among `rows_sharing_shape`."""
    if pp == 1:
        return work.prompt_length + work.mean_response
    return work.prompt_length + expected_max_length(work.mean_response, work.response_length, rows_sharing_shape)


def _tp_comm_seconds(cfg: ModelConfig, cluster: Cluster, eff: Efficiency, layout: RoleLayout, tokens_per_rank: float,
                     allreduces_per_layer: int) -> float:  # fmt: skip
    """Megatron's TP all-reduces of [tokens, h] bf16 activations (not overlapped)."""
    if layout.tp == 1:
        return 0.0
    bw = link_bytes_per_s(cluster.gpu, layout.tp, cluster.gpus_per_node)
    nbytes = tokens_per_rank * cfg.hidden_size * 2 * (cfg.num_layers // layout.pp) * allreduces_per_layer
    return allreduce_seconds(nbytes, layout.tp, bw, eff)


@dataclass(frozen=True)
class RoleCost:
    """One role at one layout: what it keeps per GPU and what its passes cost."""

    layout: RoleLayout
    states: mem.ModelStates
    activations: float
    """Peak activation bytes of its training step (trainable) or forward pass (frozen)."""
    score_activations: float
    """Peak transient bytes of its forward-only scoring pass."""
    score_s: float
    train_s: float


def role_cost(cfg: ModelConfig, layout: RoleLayout, head: str, trainable: bool, cluster: Cluster, work: Workload,
              eff: Efficiency, name: str) -> RoleCost:  # fmt: skip
    """Validate `layout` for this role and cost it; ConfigError if it cannot be built."""
    world, gpu = cluster.world, cluster.gpu
    check_layout(cfg, layout, world, name)
    dp = layout.dp(world)
    if work.rollout_batch % (dp * work.micro_batch):
        raise ConfigError(
            f"{name} layout {layout}: the rollout batch {work.rollout_batch} does not split over "
            f"dp = {dp} x micro_batch {work.micro_batch}"
        )
    if trainable and work.global_batch % (dp * work.micro_batch):
        raise ConfigError(
            f"{name} layout {layout}: the minibatch {work.global_batch} does not split over "
            f"dp = {dp} x micro_batch {work.micro_batch}"
        )
    states = mem.model_states(cfg, layout.tp, layout.pp, dp, head=head, trainable=trainable,
                              distributed_optimizer=layout.distributed_optimizer)  # fmt: skip
    # Scoring: one forward pass over the rollout batch.
    seq = _row_length(work, layout.pp, work.rollout_batch)
    tokens = work.rollout_batch * seq
    rows = work.rollout_batch // dp
    forward_mb = min(forward_microbatch_rows(rows, work.micro_batch, work.forward_micro_batch, layout.pp > 1), rows)
    score = pass_seconds(cfg, gpu, eff, tokens=tokens, seq=seq, gpus=world, backward=False, pp=layout.pp,
                         microbatches=math.ceil(rows / forward_mb), head=head)  # fmt: skip
    score += _tp_comm_seconds(cfg, cluster, eff, layout, tokens / dp, 2)
    act = score_act = mem.scoring_activations(cfg, layout.tp, micro_batch=forward_mb, seq=math.ceil(seq), head=head)
    train = 0.0
    if trainable:
        seq = _row_length(work, layout.pp, work.global_batch)
        tokens = work.global_batch * seq
        microbatches = work.global_batch // (dp * work.micro_batch)
        compute = pass_seconds(cfg, gpu, eff, tokens=tokens, seq=seq, gpus=world, backward=True,
                               recompute=layout.recompute, pp=layout.pp, microbatches=microbatches, head=head)  # fmt: skip
        tp_comm = _tp_comm_seconds(cfg, cluster, eff, layout, tokens / dp, 6 if layout.recompute == "full" else 4)
        params = max(stage_parameters(cfg, layout.tp, layout.pp, head))
        dp_bw = link_bytes_per_s(gpu, layout.tp * dp, cluster.gpus_per_node)
        if layout.distributed_optimizer:  # reduce-scatter fp32 grads, all-gather bf16 params
            sync = allgather_seconds(params * 4, dp, dp_bw, eff) + allgather_seconds(params * 2, dp, dp_bw, eff)
            opt = optimizer_seconds(params / dp, gpu, eff)
        else:
            sync = allreduce_seconds(params * 4, dp, dp_bw, eff)
            opt = optimizer_seconds(params, gpu, eff)
        train = work.minibatches * (compute + tp_comm + sync + opt)
        act = mem.training_activations(
            cfg, layout.tp, layout.pp, micro_batch=work.micro_batch, seq=math.ceil(seq), microbatches=microbatches,
            recompute=layout.recompute, sequence_parallel=layout.sequence_parallel, head=head,
        ).total  # fmt: skip
    return RoleCost(layout, states, act, score_act, score, train)


@dataclass(frozen=True)
class EngineCost:
    """The rollout engine at `generation_tp` next to an actor layout."""

    generation_tp: int
    weights: float
    """Its own TP-only copy of the actor (0 when it runs on the actor's weights)."""
    kv_cache: float
    prefill_logits: float
    generate_s: float
    refit_s: float
    rows: int
    steps: float


def engine_cost(model: ModelConfig, actor: RoleLayout, generation_tp: int, cluster: Cluster, work: Workload,
                eff: Efficiency) -> EngineCost:  # fmt: skip
    world, gpu = cluster.world, cluster.gpu
    check_layout(model, RoleLayout(generation_tp, 1), world, "generation")
    replicas = world // generation_tp
    if work.rollout_batch % replicas:
        raise ConfigError(
            f"generation tp{generation_tp}: the rollout batch {work.rollout_batch} does not split over its "
            f"{replicas} engine replicas"
        )
    rows = work.rollout_batch // replicas
    shared = actor.pp == 1 and actor.tp == generation_tp
    copy = 0.0 if shared else stage_parameters(model, generation_tp, 1)[0] * mem.DTYPE_BYTES[model.params_dtype]
    seconds, steps = generate_seconds(
        model, gpu, eff, tp=generation_tp, batch=rows, rounds=1, prompt=work.min_prompt_length,
        mean_response=work.mean_response, max_response=work.response_length,
        extra_steps=work.max_prompt_length - work.min_prompt_length,
    )  # fmt: skip
    refit = 0.0
    if not shared:  # Megatron's resharding planner moves each GPU's new shard
        spans = actor.pp > 1 and actor.tp * actor.dp(world) >= cluster.gpus_per_node
        refit = copy / ((gpu.network_bytes_per_s if spans else gpu.nvlink_bytes_per_s) * eff.comm)
    kv = mem.kv_cache_bytes(model, generation_tp, rows, work.max_prompt_length + work.response_length)
    prefill = mem.prefill_logits_bytes(model, rows, work.min_prompt_length)
    return EngineCost(generation_tp, copy, kv, prefill, seconds, refit, rows, steps)


def combine(roles: dict[str, RoleCost], engine: EngineCost, offload_optimizer: bool, offload_frozen: bool,
            gpu: GPU, eff: Efficiency) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """(peak bytes per GPU by phase, seconds by phase) of roles colocated and time-sliced.

    generate: every role's weights (frozen ones on CPU under offload_frozen), optimizer
      states and grad buffers (on CPU under offload_optimizer), the engine copy, KV cache;
    score: all weights, optimizer states unless offloaded, one forward pass's working set;
    train: everything onloaded but the frozen models, plus one training step's activations.
    """
    weights = sum(r.states.weights for r in roles.values()) + engine.weights
    frozen = roles["reference"].states.weights + roles["reward"].states.weights
    trainable = [roles[n] for n in ("actor", "critic") if n in roles]
    train_states = sum(r.states.grads + r.states.optimizer for r in trainable)
    idle_train = 0.0 if offload_optimizer else train_states
    idle_frozen = 0.0 if offload_frozen else frozen
    f, overhead = 1 + mem.FRAGMENTATION, mem.RUNTIME_OVERHEAD_BYTES
    memory = {
        "generate": weights - frozen + idle_frozen + idle_train + (engine.kv_cache + engine.prefill_logits) * f + overhead,
        "score": weights + idle_train + max(r.score_activations for r in roles.values()) * f + overhead,
        "train": weights - frozen + idle_frozen + train_states + max(r.activations for r in trainable) * f + overhead,
    }
    pcie = gpu.pcie_bytes_per_s * eff.comm
    seconds = {
        "generate": engine.generate_s,
        "score": sum(r.score_s for r in roles.values()),
        "train": sum(r.train_s for r in trainable),
        "refit": engine.refit_s,
        "offload": (2 * train_states / pcie if offload_optimizer else 0.0) + (2 * frozen / pcie if offload_frozen else 0.0),
    }
    return memory, seconds


ROLE_HEADS = {"actor": ("lm", True), "critic": ("value", True), "reference": ("lm", False), "reward": ("value", False)}


def _role_names(work: Workload) -> tuple[str, ...]:
    return ("actor", "critic", "reference", "reward") if work.critic else ("actor", "reference", "reward")


def plan(model: ModelConfig, reward_model: ModelConfig, cluster: Cluster, work: Workload, layouts: Layouts,
         eff: Efficiency) -> Plan:  # fmt: skip
    """Memory and seconds of one megarlhf iteration at `layouts`; ConfigError if the
    layouts cannot be built."""
    roles = {}
    for name in _role_names(work):
        head, trainable = ROLE_HEADS[name]
        cfg = model if name in ("actor", "reference") else reward_model
        roles[name] = role_cost(cfg, getattr(layouts, name), head, trainable, cluster, work, eff, name)
    engine = engine_cost(model, layouts.actor, layouts.generation_tp, cluster, work, eff)
    memory, seconds = combine(roles, engine, layouts.offload_optimizer, layouts.offload_frozen, cluster.gpu, eff)
    per_role = {
        n: {"weights": r.states.weights, "grads": r.states.grads, "optimizer": r.states.optimizer,
            "activations": r.activations, "kv_cache": 0.0}
        for n, r in roles.items()
    }  # fmt: skip
    per_role["engine"] = {"weights": engine.weights, "grads": 0.0, "optimizer": 0.0,
                          "activations": engine.prefill_logits, "kv_cache": engine.kv_cache}  # fmt: skip
    notes = [f"generation: {engine.rows} rows per engine replica, ~{engine.steps:.0f} decode steps"]
    return Plan(layouts, per_role, memory, cluster.gpu.memory_bytes, seconds, notes)


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= limit and n % d == 0]


def _pareto(items: list, key) -> list:
    """Items not dominated (<= in every coordinate of key(item), < in one) by another."""
    keys = [key(x) for x in items]
    return [
        x for x, kx in zip(items, keys)
        if not any(all(a <= b for a, b in zip(ky, kx)) and ky != kx for ky in keys)
    ]  # fmt: skip


# Selective recompute of core attention is free and saves nothing next to flash attention
# (plan/memory.py), so the search only chooses between none and full.
SEARCH_RECOMPUTE = ("none", "full")


def search(model: ModelConfig, reward_model: ModelConfig, cluster: Cluster, work: Workload, eff: Efficiency, *,
           top: int = 5) -> list[Plan]:  # fmt: skip
    """Every layout megarlhf can build here (TP inside a node, sequence parallel with TP,
    PP dividing the layers, the distributed optimizer on, reference and reward at one
    layout, the critic at the actor's recompute setting, each offload flag on or off),
    fastest fitting plans first; if none fits, the plans needing the least memory.
    Role options that are slower and bigger than another option of the same role are
    dropped before the combinations are tried."""
    world, gpn = cluster.world, cluster.gpus_per_node
    tps = _divisors(world, gpn)
    # Equal stages only (megarlhf checks num_layers % pp): every common divisor up to 64.
    pps = [p for p in range(1, 65) if world % p == 0 and model.num_layers % p == 0 and reward_model.num_layers % p == 0]
    grid = list(itertools.product(tps, pps))

    def options(cfg, name, recompute=None):
        head, trainable = ROLE_HEADS[name]
        out = []
        for t, p in grid:
            layout = RoleLayout(t, p, True, recompute or "none", sequence_parallel=t > 1)
            try:
                out.append(role_cost(cfg, layout, head, trainable, cluster, work, eff, name))
            except ConfigError:
                pass
        return out

    def shape(r: RoleCost) -> tuple:
        return (r.score_s + r.train_s, r.states.weights, r.states.grads + r.states.optimizer, r.activations)

    actors = [a for r in SEARCH_RECOMPUTE for a in options(model, "actor", r)]
    refs = {c.layout: c for c in options(model, "reference")}
    rms = {c.layout: c for c in options(reward_model, "reward")}
    frozen = _pareto([(refs[k], rms[k]) for k in refs if k in rms],
                     lambda f: (f[0].score_s + f[1].score_s, f[0].states.weights + f[1].states.weights,
                                max(f[0].activations, f[1].activations)))  # fmt: skip
    critics = {r: _pareto(options(reward_model, "critic", r), shape) for r in SEARCH_RECOMPUTE} if work.critic else {}
    if not actors or not frozen or (work.critic and not any(critics.values())):
        raise ConfigError(
            f"no layout of {world} GPUs splits this model and batch (every role's dp must divide the rollout "
            f"batch {work.rollout_batch} and the minibatch {work.global_batch}): try another GPU count or batch"
        )
    engines: dict[tuple, EngineCost | None] = {}
    fitting, other, counter = [], [], itertools.count()
    rank = lambda e: e[:2]  # noqa: E731  (seconds or peak bytes, then insertion order)
    for a in actors:
        for c in critics.get(a.layout.recompute, []) if work.critic else [None]:
            for (ref, rm), g in itertools.product(frozen, tps):
                key = (a.layout.tp, a.layout.pp, g)
                if key not in engines:
                    try:
                        engines[key] = engine_cost(model, a.layout, g, cluster, work, eff)
                    except ConfigError:
                        engines[key] = None
                engine = engines[key]
                if engine is None:
                    continue
                roles = {"actor": a, "reference": ref, "reward": rm} | ({"critic": c} if c else {})
                for off_opt, off_frozen in itertools.product((False, True), repeat=2):
                    memory, seconds = combine(roles, engine, off_opt, off_frozen, cluster.gpu, eff)
                    peak = max(memory.values())
                    # Fitting: fastest first; not fitting: smallest peak, then smallest other phases.
                    score = sum(seconds.values()) if peak <= cluster.gpu.memory_bytes else (peak, sum(memory.values()))
                    entry = (score, next(counter), roles, engine, off_opt, off_frozen)
                    (fitting if peak <= cluster.gpu.memory_bytes else other).append(entry)
            fitting = sorted(fitting, key=rank)[:top] if len(fitting) > 50 * top else fitting
            other = sorted(other, key=rank)[:top] if len(other) > 50 * top else other
    if not fitting and not other:
        raise ConfigError(
            f"no layout of {world} GPUs splits this model and batch: the rollout batch {work.rollout_batch} "
            f"does not split over any generation engine's replicas"
        )
    plans = []
    for _, _, roles, engine, off_opt, off_frozen in sorted(fitting or other, key=rank)[:top]:
        c = roles.get("critic")
        layouts = Layouts(roles["actor"].layout, c.layout if c else None, roles["reference"].layout,
                          roles["reward"].layout, engine.generation_tp, off_opt, off_frozen)  # fmt: skip
        plans.append(plan(model, reward_model, cluster, work, layouts, eff))
    return plans


def search_nodes(model: ModelConfig, reward_model: ModelConfig, cluster: Cluster, work: Workload, eff: Efficiency,
                 **kwargs) -> tuple[Cluster, list[Plan]]:  # fmt: skip
    """`search` on all nodes; if no layout builds or fits there, on fewer nodes (the most
    that give a fitting plan): megarlhf needs every role's data-parallel size to divide the
    batches. When nothing fits anywhere, the least-memory plans on the most nodes that build."""
    first_error, unfit = None, None
    for nodes in range(cluster.nodes, 0, -1):
        sub = replace(cluster, nodes=nodes)
        try:
            plans = search(model, reward_model, sub, work, eff, **kwargs)
        except ConfigError as err:
            first_error = first_error or err
            continue
        if plans[0].fits:
            return sub, plans
        unfit = unfit or (sub, plans)
    if unfit:
        return unfit
    raise first_error or ConfigError("no layout found")
