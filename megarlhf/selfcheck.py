"""`megarlhf selfcheck`: is this machine's parallel set-up right?

Layer: entry point (called by the CLI). A tiny Llama-style model at the requested
TP/PP/DP layout does forward+backward through Megatron-Core's pipeline schedule and DDP,
and the loss and every gradient are checked against one unsharded model on one rank.
Useful as the first command on a new cluster (NCCL, GPUs, layouts) before a real run.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megarlhf.config import ModelConfig
from megarlhf.engine.schedule import run_microbatches, wrap_ddp, zero_grads
from megarlhf.models.backbone import build_model
from megarlhf.models.logprobs import logprobs_and_entropy
from megarlhf.parallel import Layout, build_parallel_context, init_distributed, seed_all, weights

MODEL = ModelConfig(
    arch="llama", num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
    vocab_size=250, max_seq_length=128,
)  # fmt: skip
BATCH, SEQ, MICROBATCHES = 8, 64, 2


def _nll(output, batch, n_tokens, tp_group):
    logprobs, _ = logprobs_and_entropy(
        output[:, :-1], batch["tokens"][:, 1:], tp_group=tp_group, vocab_size=MODEL.vocab_size
    )
    loss = -(logprobs * batch["mask"][:, 1:]).sum() / n_tokens
    return loss, {"nll_sum": loss.detach() * n_tokens}


def run_selfcheck(tp: int = 1, pp: int = 1, steps: int = 3, seed: int = 1234) -> int:
    launch = init_distributed()
    ctx = build_parallel_context({"actor": Layout(tp, pp), "reference": Layout(1, 1)})
    actor, single = ctx["actor"], ctx["reference"]
    say = print if ctx.is_main else (lambda *a, **k: None)
    say(f"megarlhf selfcheck: world {ctx.world_size} ({launch.launcher}), actor layout {actor.layout}")

    # One unsharded copy on every rank: the oracle (and the weights' source).
    seed_all(seed, single)
    oracle = build_model(MODEL, single, "lm")
    full = {n: p.detach().clone() for n, p in oracle.named_parameters()}
    seed_all(seed, actor)
    model = build_model(MODEL, actor, "lm")
    weights.load_full_state(model, full, actor)
    ddp = wrap_ddp(model, actor)
    say(f"model: {MODEL.num_parameters() / 1e6:.2f}M parameters, {MODEL.num_layers} layers, hidden {MODEL.hidden_size}")

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, MODEL.vocab_size, (BATCH, SEQ), generator=g)
    data = {
        "tokens": tokens,
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
        "mask": torch.ones(BATCH, SEQ),
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = {k: v.to(device) for k, v in data.items()}
    n_tokens = data["mask"][:, 1:].sum()
    local = {k: v.chunk(actor.layout.dp)[actor.dp_rank] for k, v in data.items()}
    microbatches = [{k: v.chunk(MICROBATCHES)[i] for k, v in local.items()} for i in range(MICROBATCHES)]
    loss_fn = lambda out, mb: _nll(out, mb, n_tokens, actor.tp)  # noqa: E731

    times = []
    for _ in range(steps):
        zero_grads(ddp)
        t0 = time.perf_counter()
        stats = run_microbatches(ddp, actor, microbatches, loss_fn)
        times.append(time.perf_counter() - t0)

    # Loss: sum over this rank's microbatches, then over DP ranks (last stage only).
    nll = torch.stack([s["nll_sum"] for s in stats]).sum() if stats else torch.zeros((), device=device)
    dist.all_reduce(nll)  # non-last stages contribute 0
    nll = nll / (actor.layout.tp * n_tokens)  # every TP rank of the last stage holds the same sum
    grads = weights.gather_full_state(model, actor, grads=True)

    ref_out = oracle(data["tokens"], data["position_ids"], None)
    ref_loss, _ = _nll(ref_out, data, n_tokens, None)
    ref_loss.backward()
    grad_diff = max((grads[n] - p.grad).abs().max().item() for n, p in oracle.named_parameters())
    loss_diff = abs(nll.item() - ref_loss.item())

    tokens_per_s = BATCH * SEQ / min(times)
    say(f"forward+backward, {BATCH}x{SEQ} tokens in {MICROBATCHES} microbatches: "
        f"{min(times) * 1000:.0f} ms/step, {tokens_per_s:,.0f} tokens/s")  # fmt: skip
    say(f"loss {nll.item():.4f} (uniform guess: {torch.log(torch.tensor(250.0)).item():.4f})")
    say(f"vs one unsharded rank: |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}")
    ok = loss_diff < 1e-4 and grad_diff < 1e-4
    say("OK: the parallel layout reproduces the single-rank result." if ok else "MISMATCH: see above.")
    dist.barrier()
    return 0 if ok else 1
