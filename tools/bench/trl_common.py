"""The one module the TRL baselines share: argument parsing, threads, timing callbacks,
summaries and output, the placeholder tokenizer and policy loading. Imported by
tools/bench/trl_sft_rm_dpo.py (SFT, RM, DPO), tools/bench/trl_grpo.py and tools/bench/trl_ppo.py.

These run in a virtualenv with TRL and never import megarlhf or Megatron; this module
imports torch, transformers and TRL only inside its functions, so a script can set its
thread count before they load. The scripts import it from their own folder (tools/bench/).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time


# --- command line ------------------------------------------------------------------------
def add_iteration_args(p, iterations_help: str) -> None:
    """--iterations and --warmup of the GRPO and PPO baselines."""
    p.add_argument("--iterations", type=int, default=10, help=iterations_help)
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the figures")


def add_shared_args(p, vocab_help: str = "ids the placeholder tokenizer knows (>= model vocab)") -> None:
    """The arguments every baseline ends with: --pad-id, --eos-id, --vocab, --threads, --seed."""
    p.add_argument("--pad-id", type=int, default=0)
    p.add_argument("--eos-id", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32, help=vocab_help)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (and OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=1234)


def parse_iteration_args(p, argv=None):
    """Adds the arguments the GRPO and PPO baselines end with (add_shared_args), parses
    `argv` and checks that --iterations exceeds --warmup."""
    add_shared_args(p)
    args = p.parse_args(argv)
    if args.iterations <= args.warmup:
        p.error(f"--iterations {args.iterations} must exceed --warmup {args.warmup}")
    return args


# --- set-up --------------------------------------------------------------------------------
def use_threads(threads: int, seed: int | None = None) -> None:
    """OMP_NUM_THREADS / MKL_NUM_THREADS for what loads after this call, and torch's
    intra-op threads for this process; also seeds torch when `seed` is given. Call it
    before importing transformers or TRL."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --- measuring -----------------------------------------------------------------------------
def count_optimizer_steps(meter, optimizer) -> None:
    """Adds one to `meter.optimizer_steps` after every step of `optimizer` (a post-hook on
    the torch optimizer, unwrapped from accelerate's wrapper when there is one)."""
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    inner.register_step_post_hook(lambda *_: setattr(meter, "optimizer_steps", meter.optimizer_steps + 1))


def iteration_callback(meter):
    """A TrainerCallback that restarts `meter`'s clock when training begins and calls
    `meter.step_end()` at every on_step_end (TRL fires it once per optimizer step for
    GRPO, once per update for TRL 1.12's PPO)."""
    from transformers import TrainerCallback

    class IterationTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            meter.reset(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            meter.step_end()

    return IterationTimer()


def summarize_iterations(rows: list[dict], warmup: int, phases: tuple[str, ...]) -> dict:
    """Per-iteration rows ({"seconds", "generated", "trained", "tokens", "optimizer_steps"}
    and one key per phase) -> the figures of the iterations after the first `warmup`."""
    timed = rows[warmup:]
    if not timed:
        raise SystemExit(f"error: no timed iterations: {len(rows)} run, --warmup {warmup}; raise --iterations")
    tokens, seconds, n = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed), len(timed)
    return {
        "timed_iterations": n, "tokens": tokens, "seconds": seconds,
        "seconds_per_iteration": seconds / n,
        "median_seconds_per_iteration": statistics.median(r["seconds"] for r in timed),
        "generated_per_iteration": sum(r["generated"] for r in timed) / n,
        "trained_per_iteration": sum(r["trained"] for r in timed) / n,
        "median_tokens_per_second": statistics.median(r["tokens"] / r["seconds"] for r in timed),
        "total_tokens_per_second": tokens / seconds,
        "phase_seconds": {k: sum(r[k] for r in timed) / n for k in phases},
        "optimizer_steps_per_iteration": sum(r["optimizer_steps"] for r in timed) / n,
    }  # fmt: skip


# --- result --------------------------------------------------------------------------------
def versions() -> dict:
    """The versions of TRL, transformers and torch this baseline ran with."""
    import torch
    import transformers
    import trl

    return {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def iteration_result(args, rows: list[dict], parameters: dict, config, config_keys, figures: dict) -> dict:
    """The JSON object the GRPO and PPO baselines print last: settings, `config_keys` of
    TRL's `config`, versions, this process's peak RSS (ru_maxrss, KiB on Linux), the
    summary `figures` and the per-iteration `rows`."""
    import torch

    return {
        "framework": "trl", "iterations": len(rows), "warmup": args.warmup,
        "threads": torch.get_num_threads(), "parameters": parameters,
        "config": {k: getattr(config, k) for k in config_keys},
        "versions": versions(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **figures, "per_iteration": rows,
    }  # fmt: skip


# --- models and tokenizer ----------------------------------------------------------------


def build_tokenizer(vocab: int, pad_id: int, eos_id: int, padding_side: str = "right"):
    """A WordLevel tokenizer with one piece `<id{i}>` per id: TRL wants a processing_class
    with pad and EOS pieces. It never tokenizes pre-tokenized rows (SFT, RM, PPO prompts);
    text made of these pieces (DPO, GRPO prompts) splits at every piece and encodes to
    exactly those ids, with no BOS, EOS or merges, so TRL's own tokenization gives back
    megarlhf's ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = {f"<id{i}>": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(pieces, unk_token=f"<id{pad_id}>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<id\d+>"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=f"<id{pad_id}>", eos_token=f"<id{eos_id}>", padding_side=padding_side
    )


def load_policy(path: str):
    """A Hugging Face LlamaForCausalLM folder in float32 with SDPA attention, on CPU."""
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
