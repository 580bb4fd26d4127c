"""`megarlhf plan` / tools/plan_rlhf.py: arguments, tables and JSON. Layer: plan/.

Without --actor the planner searches megarlhf's layouts for the fastest one that fits;
with --actor it evaluates that layout. --calibrate prints the published peer rows next to
the model's predictions. Bad input (unknown preset or GPU, a layout that does not divide
the GPUs, batches that do not split) exits with code 2 and a message naming the value.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from megarlhf.config.errors import ConfigError
from megarlhf.plan.hardware import GIB, GPUS, get_gpu
from megarlhf.plan.planner import Cluster, Layouts, Plan, RoleLayout, Workload, parse_layout, plan, search_nodes
from megarlhf.plan.shapes import PRESETS, describe, load_shape
from megarlhf.plan.timing import Efficiency

DESCRIPTION = (
    "Size an RLHF run before launching it: per-GPU memory of every role (weights, gradients, "
    "optimizer states, activations, KV cache) with a fits / does-not-fit verdict, predicted "
    "seconds per phase of one PPO iteration, and a search for the fastest layout that fits."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and cluster")
    g.add_argument("--model", default="llama3-70b",
                   help=f"preset ({', '.join(sorted(PRESETS))}), a Hugging Face folder, or a megarlhf YAML config / run dir")
    g.add_argument("--reward-model", default=None, help="reward model and critic shape (default: --model)")
    g.add_argument("--gpu", default="H100", help=f"one of {', '.join(GPUS)} (default H100)")
    g.add_argument("--nodes", type=int, default=8)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g = p.add_argument_group("workload (one PPO iteration)")
    g.add_argument("--rollout-batch", type=int, default=1024, help="sequences generated per iteration (default 1024)")
    g.add_argument("--global-batch", type=int, default=128, help="sequences per optimizer step (default 128)")
    g.add_argument("--ppo-epochs", type=int, default=1)
    g.add_argument("--micro-batch", type=int, default=1)
    g.add_argument("--forward-micro-batch", type=int, default=0,
                   help="sequences per forward-only scoring pass (train.forward_micro_batch_size; default: --micro-batch)")
    g.add_argument("--prompt-length", type=float, default=256, help="mean prompt tokens (default 256)")
    g.add_argument("--max-prompt-length", type=int, default=1024, help="longest prompt (default 1024)")
    g.add_argument("--min-prompt-length", type=int, default=32, help="shortest prompt in a batch (default 32)")
    g.add_argument("--response-length", type=int, default=1024, help="max new tokens (default 1024)")
    g.add_argument("--mean-response-length", type=float, default=0.0, help="mean new tokens (default: half the max)")
    g.add_argument("--no-critic", action="store_true", help="no critic (GRPO-style)")
    g = p.add_argument_group("layout (omit --actor to search)")
    g.add_argument("--actor", default=None, help="actor TP/PP, e.g. tp8-pp4 (default: search)")
    g.add_argument("--critic", default=None, help="critic TP/PP (default: the actor's)")
    g.add_argument("--reference", default=None, help="reference TP/PP (default: the actor's)")
    g.add_argument("--reward", default=None, help="reward model TP/PP (default: the reference's)")
    g.add_argument("--generation-tp", type=int, default=0, help="rollout engine TP (default: the actor's TP)")
    g.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--no-distributed-optimizer", action="store_true")
    g.add_argument("--offload-optimizer", action="store_true")
    g.add_argument("--offload-frozen", action="store_true")
    g = p.add_argument_group("output")
    g.add_argument("--top", type=int, default=3, help="alternatives listed by the search (default 3)")
    g.add_argument("--calibrate", action="store_true",
                   help="published peer step times vs predicted, the fitted factors, and megarlhf's plan on the same GPUs")
    g.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _workload(args) -> Workload:
    return Workload(
        rollout_batch=args.rollout_batch, global_batch=args.global_batch, ppo_epochs=args.ppo_epochs,
        micro_batch=args.micro_batch, forward_micro_batch=args.forward_micro_batch, prompt_length=args.prompt_length, max_prompt_length=args.max_prompt_length,
        min_prompt_length=args.min_prompt_length, response_length=args.response_length,
        mean_response_length=args.mean_response_length, critic=not args.no_critic,
    )  # fmt: skip


def _layouts(args) -> Layouts:
    flags = dict(distributed_optimizer=not args.no_distributed_optimizer, recompute=args.recompute,
                 sequence_parallel=args.sequence_parallel)  # fmt: skip
    actor = parse_layout(args.actor, **flags)
    critic = None if args.no_critic else parse_layout(args.critic, **flags) if args.critic else actor
    ref = parse_layout(args.reference) if args.reference else RoleLayout(actor.tp, actor.pp)
    reward = parse_layout(args.reward) if args.reward else ref
    return Layouts(actor, critic, ref, reward, args.generation_tp or actor.tp, args.offload_optimizer, args.offload_frozen)


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def plan_dict(p: Plan, cluster: Cluster) -> dict:
    return {
        "layout": p.layouts.describe(),
        "layouts": {k: (str(v) if isinstance(v, RoleLayout) else v) for k, v in asdict(p.layouts).items()},
        "gpus": cluster.world,
        "memory_gib_per_gpu": {r: {k: round(v / GIB, 2) for k, v in c.items()} for r, c in p.memory.items()},
        "phase_peak_gib": {k: round(v / GIB, 2) for k, v in p.phase_memory.items()},
        "capacity_gib": round(p.capacity / GIB, 2),
        "fits": p.fits,
        "seconds": {k: round(v, 2) for k, v in p.phases.items()},
        "seconds_per_iteration": round(p.seconds, 2),
        "notes": p.notes,
    }


def plan_table(p: Plan, cluster: Cluster, title: str = "layout") -> str:
    cols = ("weights", "grads", "optimizer", "activations", "kv_cache")
    lines = [f"{title}: {p.layouts.describe()} on {cluster.world} GPUs", "",
             f"{'GiB per GPU':<12}" + "".join(f"{c:>12}" for c in cols)]  # fmt: skip
    for role, comps in p.memory.items():
        lines.append(f"{role:<12}" + "".join(f"{(_gib(comps[c]) if comps[c] else '-'):>12}" for c in cols))
    peaks = "  ".join(f"{k} {_gib(v)}" for k, v in p.phase_memory.items())
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines += ["", f"peak per phase (GiB, incl. runtime overhead): {peaks}  /  {_gib(p.capacity)} -> {verdict}", ""]
    lines.append("seconds per iteration: " + "  ".join(f"{k} {v:.1f}" for k, v in p.phases.items()) + f"  = {p.seconds:.1f}")
    lines += [f"  {n}" for n in p.notes]
    return "\n".join(lines)


def calibration(eff: Efficiency) -> dict:
    """Peer rows: published vs predicted (with per-phase seconds), the fitted factors, the
    leave-one-out errors, and megarlhf's recommended layout on each row's GPUs."""
    from megarlhf.plan import peers

    loo = peers.leave_one_out()
    rows = []
    for row, held_out in zip(peers.ROWS, loo):
        phases = row.predict(eff)
        total = sum(phases.values())
        ours = _megarlhf_on(row, eff)
        rows.append({
            "row": row.name, "gpus": row.gpus, "published_s": row.published_s, "predicted_s": round(total, 1),
            "error": round(total / row.published_s - 1, 3), "error_left_out": round(held_out, 3),
            "phases_s": {k: round(v, 1) for k, v in phases.items()}, "megarlhf": ours,
        })  # fmt: skip
    return {"efficiency": eff.as_dict(), "fitted": list(Efficiency.FITTED), "rows": rows}


def _megarlhf_on(row, eff: Efficiency) -> dict:
    """megarlhf's searched layout for the row's model, GPUs and batch (prompt/response as the
    row's assumptions)."""
    from megarlhf.plan import peers

    if row.framework == "nemo-aligner":
        model = PRESETS["llama3-70b"]
        work = Workload(rollout_batch=1024, global_batch=128, prompt_length=peers.NEMO_PROMPT_TOKENS,
                        response_length=peers.NEMO_MAX_RESPONSE, mean_response_length=row.settings["mean_response"])  # fmt: skip
    else:
        model = PRESETS["llama2-70b"]
        work = Workload(rollout_batch=1024, global_batch=128, prompt_length=peers.OPENRLHF_PROMPT_TOKENS,
                        response_length=1024, mean_response_length=peers.OPENRLHF_MEAN_RESPONSE)  # fmt: skip
    cluster = Cluster(row.gpu, row.gpus // 8)
    sub, plans = search_nodes(model, model, cluster, work, eff, top=1)
    p = plans[0]
    return {"gpus_used": sub.world, "layout": p.layouts.describe(), "seconds": round(p.seconds, 1),
            "phases_s": {k: round(v, 1) for k, v in p.phases.items()}, "fits": p.fits,
            "peak_gib": round(p.peak_memory / GIB, 1)}  # fmt: skip


def calibration_table(cal: dict) -> str:
    e = cal["efficiency"]
    lines = [
        "efficiency factors (fitted on all rows at once: " + ", ".join(cal["fitted"]) + "):",
        f"  mfu {e['mfu']:.2f}  hbm {e['hbm']:.2f}  decode_step {e['decode_step_s'] * 1e3:.1f} ms  "
        f"comm {e['comm']:.2f} (fixed)  latency {e['latency_s'] * 1e6:.0f} us (fixed)",
        "",
        f"{'row':<42}{'published s':>12}{'predicted s':>12}{'error':>8}{'left out':>9}   megarlhf",
    ]
    for r in cal["rows"]:
        m = r["megarlhf"]
        used = m["gpus_used"]
        if not m["fits"]:
            ours = f"does not fit: {m['peak_gib']:.0f} GiB per GPU at best"
        else:
            ours = f"{m['seconds']:.0f} s"
        ours += f" on {used} of {r['gpus']} GPUs" if used != r["gpus"] else ""
        lines.append(f"{r['row']:<42}{r['published_s']:>12.1f}{r['predicted_s']:>12.1f}{r['error']:>+8.1%}"
                     f"{r['error_left_out']:>+9.1%}   {ours}")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    prog = "megarlhf plan"
    try:
        eff = Efficiency()
        if args.calibrate:
            cal = calibration(eff)
            print(json.dumps(cal, indent=1) if args.json else calibration_table(cal))
            return 0
        model = load_shape(args.model)
        reward_model = load_shape(args.reward_model) if args.reward_model else model
        cluster = Cluster(get_gpu(args.gpu), args.nodes, args.gpus_per_node)
        work = _workload(args)
        header = [
            f"model    {args.model}: {describe(model)}" + (f"; reward/critic {describe(reward_model)}" if args.reward_model else ""),
            f"cluster  {cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu.name} ({cluster.world} GPUs, "
            f"{_gib(cluster.gpu.memory_bytes)} GiB each)",
            f"work     {work.rollout_batch} rollouts / iteration, minibatch {work.global_batch}, {work.ppo_epochs} epoch(s), "
            f"prompt ~{work.prompt_length:.0f} ({work.min_prompt_length}..{work.max_prompt_length}), response <= "
            f"{work.response_length} (mean {work.mean_response:.0f})" + ("" if work.critic else ", no critic"),
        ]  # fmt: skip
        if args.actor:
            used, plans = cluster, [plan(model, reward_model, cluster, work, _layouts(args), eff)]
        else:
            used, plans = search_nodes(model, reward_model, cluster, work, eff, top=args.top)
        if args.json:
            out = {"model": describe(model), "gpu": cluster.gpu.name, "gpus": cluster.world, "gpus_used": used.world,
                   "workload": asdict(work), "efficiency": eff.as_dict(), "plans": [plan_dict(p, used) for p in plans]}  # fmt: skip
            print(json.dumps(out, indent=1))
            return 0
        print("\n".join(header))
        if used.world != cluster.world:
            print(f"note     no layout works on all {cluster.world} GPUs; the plan uses {used.world} of them")
        print()
        title = "layout" if args.actor else "recommended layout" if plans[0].fits else "nothing fits; least memory"
        print(plan_table(plans[0], used, title))
        if len(plans) > 1:
            print("\nnext best:")
            for p in plans[1:]:
                print(f"  {p.seconds:8.1f} s  peak {_gib(p.peak_memory)} GiB  {p.layouts.describe()}")
        e = eff
        print(f"\nfactors: mfu {e.mfu:.2f}, hbm {e.hbm:.2f}, decode step {e.decode_step_s * 1e3:.1f} ms "
              "(fitted on published peer step times: --calibrate)")  # fmt: skip
        return 0
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="plan_rlhf.py", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))
