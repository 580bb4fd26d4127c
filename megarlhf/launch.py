"""`megarlhf launch <stage>`: render (and submit) the SLURM batch script of one stage.

Layer: cli (beside cli.py; imports config/, and parallel/'s layout checks). One script
body serves every stage and both ways of starting ranks:

- `torchrun` (default): one `srun` task per node runs torchrun, which starts
  `--gpus-per-node` ranks; the nodes meet in a c10d rendezvous on the first node of
  `$SLURM_JOB_NODELIST`.
- `srun`: one task per rank; megarlhf reads its rank from SLURM_PROCID / SLURM_NTASKS /
  SLURM_LOCALID (parallel/distributed.py) and meets the others on the first node.

Time limits and preemption: `#SBATCH --signal=B:USR1@N --requeue`. The batch shell gets
SIGUSR1 N seconds before the time limit (or from `scancel --signal=USR1 --batch`), passes
it to every rank through srun, waits until they have saved a checkpoint after their
current step and exited 0 (trainers/preempt.py), then `scontrol requeue`s the job, whose
next run continues with `--resume auto` (which every run gets). Output of every run of the
job is appended to `run_dir/logs/slurm-<jobid>.out`.

`launch/<stage>.sbatch` are this module's generic renderings (arguments from the command
line, sizes from sbatch options); regenerate them with `python -m megarlhf.launch launch/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megarlhf import __version__
from megarlhf.config import ConfigError, RoleLayoutConfig, load_config

GENERIC_STAGES = ("sft", "rm", "ppo", "dpo", "grpo")
"""Stages with a generic script in launch/."""

MAIN_ROLE = {"rm": "reward"}
"""Name of the model a stage's `layout` places (default: actor)."""


@dataclass(frozen=True)
class SlurmJob:
    """Everything one rendered batch script fixes. `args=None` renders a generic script
    that takes the stage's arguments from its own command line."""

    stage: str
    nodes: int = 1
    """Nodes (#SBATCH --nodes)."""
    gpus_per_node: int = 8
    """Ranks per node: GPUs per node, or CPU processes with cpu=True."""
    cpu: bool = False
    """Ranks on CPU (gloo): no GPUs requested."""
    cpus_per_node: int = 0
    """CPUs per node to request; 0 = whole nodes (--exclusive --mem=0)."""
    launcher: str = "torchrun"
    """'torchrun' (one task per node) or 'srun' (one task per rank)."""
    partition: str = ""
    account: str = ""
    time: str = ""
    """sbatch --time (e.g. 04:00:00, 2-00:00:00); '' = the partition's default."""
    job_name: str = ""
    container_image: str = ""
    """pyxis --container-image for the ranks ('' = run on the host)."""
    container_mounts: str = ""
    """pyxis --container-mounts (src:dst[,src:dst...])."""
    signal_seconds: int = 600
    """SIGUSR1 this long before the time limit (0 = none): one step plus a checkpoint must fit."""
    dependency: str = ""
    """sbatch --dependency (e.g. afterok:1234); adds --kill-on-invalid-dep=yes."""
    python: str = "python"
    """Python that runs torchrun / megarlhf on the nodes."""
    env: tuple[str, ...] = ()
    """Extra KEY=VALUE exported to the ranks (NCCL_IB_HCA=..., NCCL_SOCKET_IFNAME=...)."""
    sbatch_args: tuple[str, ...] = ()
    """Extra #SBATCH options, e.g. --qos=high."""
    args: tuple[str, ...] | None = None
    """megarlhf <stage> arguments (--config FILE key=value ...); None = the script's own."""
    run_dir: str = ""
    """Absolute run directory: logs go to run_dir/logs/slurm-<jobid>.out ('' = sbatch's default)."""
    workdir: str = ""
    """#SBATCH --chdir: where relative paths in the config resolve ('' = the submit directory)."""
    notes: tuple[str, ...] = ()
    """Comment lines for the script's header (layouts, config)."""


def render(job: SlurmJob) -> str:
    """The batch script of `job`, ready for sbatch."""
    generic = job.args is None
    world = f"{job.nodes} node(s) x {job.gpus_per_node} {'CPU ranks' if job.cpu else 'GPUs'}"
    head = ["#!/bin/bash"]
    if generic:
        head += [
            f"# megarlhf {job.stage} on SLURM: generic script (megarlhf {__version__}). Sizes come from sbatch options:",
            f"#   sbatch --nodes=N --gpus-per-node=G --output=RUN_DIR/logs/slurm-%j.out launch/{job.stage}.sbatch --config FILE [key=value ...]",
            f"# `megarlhf launch {job.stage} --config FILE --nodes N --gpus-per-node G` renders one with everything",
            "# filled in, its layouts checked and its log in the run directory. Environment read at submit time:",
            "# RANKS_PER_NODE (default: the node's GPUs), LAUNCHER (torchrun|srun), PYTHON, CONTAINER_IMAGE, CONTAINER_MOUNTS,",
            "# RUN_DIR (the config's train.run_dir: then SIGUSR1 requeues only a run that stopped early).",
        ]
    else:
        head += [f"# megarlhf {job.stage} on {world} = {job.nodes * job.gpus_per_node} ranks ({job.launcher}); "
                 f"rendered by `megarlhf launch` (megarlhf {__version__})"]  # fmt: skip
        head += [f"#   {line}" for line in job.notes]
    head += _sbatch_lines(job)
    return "\n".join(head) + "\n\nset -euo pipefail\n\n" + _parameters(job) + _BODY


def _sbatch_lines(job: SlurmJob) -> list[str]:
    opts = [f"--job-name={job.job_name or 'megarlhf-' + job.stage}", f"--nodes={job.nodes}"]
    per_node_tasks = 1 if job.launcher == "torchrun" else job.gpus_per_node
    opts.append(f"--ntasks-per-node={per_node_tasks}")
    if not job.cpu:
        opts.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_node:
        opts.append(f"--cpus-per-task={max(1, job.cpus_per_node // per_node_tasks)}")
    else:
        opts += ["--exclusive", "--mem=0"]
    for name in ("partition", "account", "time"):
        if getattr(job, name):
            opts.append(f"--{name}={getattr(job, name)}")
    if job.signal_seconds:
        # B: the batch shell gets it (and forwards it); the ranks need it too, see _BODY.
        opts.append(f"--signal=B:USR1@{job.signal_seconds}")
    opts += ["--requeue", "--open-mode=append"]  # a requeued run appends to the same log
    if job.run_dir:
        opts.append(f"--output={job.run_dir}/logs/slurm-%j.out")
    if job.workdir:
        opts.append(f"--chdir={job.workdir}")
    if job.dependency:
        opts += [f"--dependency={job.dependency}", "--kill-on-invalid-dep=yes"]
    opts += list(job.sbatch_args)
    return [f"#SBATCH {o}" for o in opts]


def _parameters(job: SlurmJob) -> str:
    q = shlex.quote
    if job.args is None:
        lines = [
            "# --- what runs (each can be set in the environment at submit time) ---",
            f"STAGE={job.stage}",
            'RANKS_PER_NODE=${RANKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}',
            "LAUNCHER=${LAUNCHER:-torchrun}",
            "PYTHON=${PYTHON:-python}",
            "CONTAINER_IMAGE=${CONTAINER_IMAGE:-}",
            "CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}",
            'ARGS=("$@")',
            "RUN_DIR=${RUN_DIR:-}  # the config's train.run_dir; unknown here unless set",
        ]
    else:
        lines = [
            "# --- what runs ---",
            f"STAGE={job.stage}",
            f"RANKS_PER_NODE={job.gpus_per_node}",
            f"LAUNCHER={job.launcher}",
            f"PYTHON={q(job.python)}",
            f"CONTAINER_IMAGE={q(job.container_image)}",
            f"CONTAINER_MOUNTS={q(job.container_mounts)}",
            f"ARGS=({' '.join(q(a) for a in job.args)})",
            f"RUN_DIR={q(job.run_dir)}",
        ]
    lines += [
        "",
        "# --- environment Megatron-Core and NCCL want ---",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1      # TP/SP communication kernels run in issue order (overlap)",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed or hung collective ends the job, not the time limit",
        "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
        "export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-30}  # prompt logs; progress bars every 30 s",
    ]
    lines += [f"export {key}={q(value)}" for key, value in (e.split("=", 1) for e in job.env)]
    return "\n".join(lines) + "\n"


_BODY = r"""
# --- where the ranks start: rendezvous on the first node of the allocation ---
NODES=$SLURM_JOB_NUM_NODES
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
# The address SLURM itself reaches that node at (its NodeAddr; the name when not shown).
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" -o 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p' || true)
HEAD_ADDR=${HEAD_ADDR:-$HEAD_NODE}
PORT=$((20000 + SLURM_JOB_ID % 20000))  # per job: jobs that share a node do not collide
CPUS_PER_NODE=${SLURM_CPUS_ON_NODE:-$RANKS_PER_NODE}
CPUS_PER_RANK=$(( CPUS_PER_NODE / RANKS_PER_NODE > 0 ? CPUS_PER_NODE / RANKS_PER_NODE : 1 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_RANK}
SRUN=(srun --kill-on-bad-exit=1 --nodes="$NODES")
if [[ -n $CONTAINER_IMAGE ]]; then
  SRUN+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$PWD")
  [[ -z $CONTAINER_MOUNTS ]] || SRUN+=(--container-mounts="$CONTAINER_MOUNTS")
fi
if [[ $LAUNCHER == torchrun ]]; then
  # One torchrun per node, RANKS_PER_NODE workers each; c10d rendezvous on the first node.
  SRUN+=(--ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE")
  CMD=("$PYTHON" -m torch.distributed.run --nnodes="$NODES" --nproc-per-node="$RANKS_PER_NODE"
       --rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$PORT" --rdzv-id="$SLURM_JOB_ID" --max-restarts=0
       -m megarlhf "$STAGE" --resume auto "${ARGS[@]}")
else
  # One task per rank: megarlhf reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.
  SRUN+=(--ntasks-per-node="$RANKS_PER_NODE" --cpus-per-task="$CPUS_PER_RANK")
  export MASTER_ADDR=$HEAD_ADDR MASTER_PORT=$PORT
  unset RANK LOCAL_RANK WORLD_SIZE  # torchrun's variables from the submitting shell would win over SLURM's
  CMD=("$PYTHON" -m megarlhf "$STAGE" --resume auto "${ARGS[@]}")
fi
# SIGUSR1 must reach the workers and nothing else: torchrun's agent would tear its workers
# down on it, and a rank would die of it before its trainer's handler exists. So the task
# ignores it (inherited through exec) until the trainer installs its handler.
IGNORE_USR1=(bash -c 'trap "" USR1; exec "$@"' ignore-usr1)

echo "megarlhf $STAGE: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NODES node(s) [$SLURM_JOB_NODELIST]," \
     "$RANKS_PER_NODE rank(s) per node via $LAUNCHER, rendezvous $HEAD_NODE ($HEAD_ADDR:$PORT), $(date -u +%FT%TZ)"
echo "+ ${SRUN[*]} ${CMD[*]}"

# --- run. SIGUSR1 -> every rank saves a checkpoint after its current step, exits 0 -> requeue.
# SIGTERM (scancel, preemption) reaches every process from SLURM itself: keep waiting while
# the ranks save, within SLURM's KillWait / GraceTime.
STOPPED=${RUN_DIR:+$RUN_DIR/logs/stopped}  # rank 0 writes it when a signal ended training early
[[ -z $STOPPED ]] || rm -f "$STOPPED"
STOP=""
SRUN_PID=""
on_signal() {
  STOP=$1
  echo "megarlhf: SIG$1 at $(date -u +%T): the ranks save a checkpoint after their current step and stop"
  if [[ $1 == USR1 && -n $SRUN_PID ]]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi  # srun signals every rank
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
"${SRUN[@]}" "${IGNORE_USR1[@]}" "${CMD[@]}" &
SRUN_PID=$!
rc=0
wait "$SRUN_PID" || rc=$?  # returns early when a trapped signal arrives
while kill -0 "$SRUN_PID" 2>/dev/null; do
  # Again every 30 s, for ranks that were still starting (signal ignored) the first time.
  for _ in $(seq 30); do kill -0 "$SRUN_PID" 2>/dev/null && sleep 1 || break; done
  if [[ $STOP == USR1 ]]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
done
rc=0
wait "$SRUN_PID" || rc=$?
if [[ $STOP == USR1 && $rc -eq 0 ]]; then
  if [[ -z $STOPPED || -e $STOPPED ]]; then
    echo "megarlhf: checkpoint saved; requeueing job $SLURM_JOB_ID, which continues with --resume auto"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "megarlhf: training had finished; nothing to requeue"
  fi
fi
exit "$rc"
"""


# --- validation -------------------------------------------------------------------------
def role_layouts(cfg, stage: str) -> dict[str, tuple[int, int]]:
    """{role: (tp, pp)} of every layout in a stage config: `layout`, every `*_layout`
    (0 = the actor's; no reward model without reward_model_path) and the rollout engine's
    `generation.tp`."""
    actor = cfg.layout
    out = {MAIN_ROLE.get(stage, "actor"): (actor.tp, actor.pp)}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        role = f.name.removesuffix("_layout")
        if isinstance(value, RoleLayoutConfig) and not (role == "reward" and not getattr(cfg, "reward_model_path", "")):
            out[role] = value.resolve(actor)
    generation = getattr(cfg, "generation", None)
    if generation is not None and hasattr(generation, "tp"):
        out["rollout"] = (generation.tp or actor.tp, 1)
    order = ("actor", "critic", "reference", "reward", "rollout")
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def check_layouts(cfg, stage: str, nodes: int, ranks_per_node: int) -> tuple[list[str], list[str]]:
    """(one 'role tpX-ppY-dpZ' line per role, warnings). Raises LayoutError / ConfigError
    (exit code 2) for a layout that cannot fill nodes x ranks_per_node ranks, a model it
    cannot split, or a batch that does not divide over data-parallel ranks."""
    from megarlhf.parallel.layout import Layout

    world = nodes * ranks_per_node
    lines, warnings, dp = [], [], {}
    for role, (tp, pp) in role_layouts(cfg, stage).items():
        try:
            layout = Layout(tp, pp).resolve(world)
            dp[role] = layout.dp
        except ValueError as err:
            raise type(err)(f"{role} layout: {err} ({nodes} nodes x {ranks_per_node} per node)") from None
        if role in (MAIN_ROLE.get(stage, "actor"), "reference", "rollout"):
            # The roles that hold `model` (the critic's and reward's shapes come from their checkpoints).
            m = cfg.model
            layout.check_model(
                num_layers=m.num_layers, num_attention_heads=m.num_attention_heads, num_query_groups=m.query_groups,
                ffn_hidden_size=m.ffn_size, hidden_size=m.hidden_size,
            )  # fmt: skip
            if m.padded_vocab_size % tp:
                raise ConfigError(
                    f"{role}: padded vocabulary {m.padded_vocab_size} is not divisible by tp = {tp}: "
                    f"raise model.make_vocab_size_divisible_by to a multiple of {tp}"
                )
        if tp > ranks_per_node or ranks_per_node % tp:
            warnings.append(
                f"{role} tp={tp} does not fit in one node of {ranks_per_node}: its all-reduces in every "
                f"layer would cross nodes (Megatron places TP ranks next to each other); use a tp that divides {ranks_per_node}"
            )
        lines.append(f"{role} {layout}")
    if getattr(cfg, "generation", None) is None:
        # Supervised stages: sequences per step over DP ranks.
        cfg.train.num_microbatches(world // (cfg.layout.tp * cfg.layout.pp))
    else:
        # PPO/GRPO: the rollout batch and minibatches over every role's DP ranks.
        cfg.check_batch_split(dp)
    return lines, warnings


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_seconds(value: str) -> int:
    """sbatch --time in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME.match(value.strip())
    if not m:
        raise ConfigError(f"--time {value!r}: expected minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    parts = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mnt, s = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + mnt) * 60 + s
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def check_job(job: SlurmJob) -> None:
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise ConfigError(f"--nodes {job.nodes} --gpus-per-node {job.gpus_per_node}: both must be >= 1")
    if job.launcher not in ("torchrun", "srun"):
        raise ConfigError(f"--launcher {job.launcher!r}: expected torchrun or srun")
    if job.cpus_per_node < 0 or job.signal_seconds < 0:
        raise ConfigError("--cpus-per-node and --signal-seconds must be >= 0")
    if job.time and job.signal_seconds and job.signal_seconds >= time_limit_seconds(job.time):
        raise ConfigError(
            f"--signal-seconds {job.signal_seconds} is not shorter than --time {job.time}: the stop signal "
            f"would come before training starts; lower --signal-seconds or raise --time"
        )
    if job.container_mounts and not job.container_image:
        raise ConfigError("--container-mounts needs --container-image")
    for item in job.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", item):
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
    for option in job.sbatch_args:
        if not option.startswith("-"):
            raise ConfigError(f"--sbatch-arg {option!r}: expected an sbatch option, e.g. --sbatch-arg=--qos=high")
    if job.dependency and not re.match(r"^[a-z_]+(:[0-9_+]+)*([,?][a-z_]+(:[0-9_+]+)*)*$", job.dependency):
        raise ConfigError(f"--dependency {job.dependency!r}: expected e.g. afterok:1234 or afterok:1234:1235")


# --- the command ------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, stages: list[str]) -> None:
    p.add_argument("stage", choices=stages, help="which stage the job runs")
    p.add_argument("--config", required=True, help="the stage's YAML config (checked before anything is submitted)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, passed to the job")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= ranks) per node (default 8)")
    p.add_argument("--cpu", action="store_true", help="ranks on CPU (gloo), no GPUs requested; --gpus-per-node = ranks per node")
    p.add_argument("--cpus-per-node", type=int, default=0, help="CPUs per node (default 0: whole nodes, --exclusive)")
    p.add_argument("--launcher", choices=("torchrun", "srun"), default="torchrun",
                   help="torchrun: one task per node, c10d rendezvous on the first node (default); srun: one task per rank")  # fmt: skip
    p.add_argument("--partition", default="", help="sbatch --partition")
    p.add_argument("--account", default="", help="sbatch --account")
    p.add_argument("--time", default="", help="sbatch --time, e.g. 04:00:00 (default: the partition's)")
    p.add_argument("--job-name", default="", help="sbatch --job-name (default megarlhf-<stage>)")
    p.add_argument("--container-image", default="", help="pyxis --container-image, e.g. nvcr.io#nvidia/pytorch:25.01-py3")
    p.add_argument("--container-mounts", default="", help="pyxis --container-mounts, e.g. /lustre:/lustre")
    p.add_argument("--signal-seconds", type=int, default=600,
                   help="SIGUSR1 this many seconds before the time limit: checkpoint, exit, requeue (default 600; 0 = off)")  # fmt: skip
    p.add_argument("--dependency", default="", help="sbatch --dependency, e.g. afterok:1234 (+ --kill-on-invalid-dep=yes)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="export to the ranks (repeatable), e.g. NCCL_SOCKET_IFNAME=ib0")  # fmt: skip
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option (repeatable), written with '=': --sbatch-arg=--qos=high")  # fmt: skip
    p.add_argument("--python", default="", help="python on the nodes (default: this one; 'python' in a container)")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")


def build_job(args: argparse.Namespace, config_class: type) -> tuple[SlurmJob, list[str]]:
    """Load and check the config, resolve paths; (the job, warnings)."""
    from megarlhf.checkpoint.source import apply_model_source  # no Megatron: fine on a login node

    cfg = load_config(config_class, args.config, args.overrides, prepare=apply_model_source)
    job = SlurmJob(
        stage=args.stage, nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpu=args.cpu,
        cpus_per_node=args.cpus_per_node, launcher=args.launcher, partition=args.partition,
        account=args.account, time=args.time, job_name=args.job_name,
        container_image=args.container_image, container_mounts=args.container_mounts,
        signal_seconds=args.signal_seconds, dependency=args.dependency,
        python=args.python or ("python" if args.container_image else sys.executable),
        env=tuple(args.env), sbatch_args=tuple(args.sbatch_arg),
    )  # fmt: skip
    check_job(job)
    layouts, warnings = check_layouts(cfg, args.stage, args.nodes, args.gpus_per_node)
    workdir = os.getcwd()
    config = str(Path(args.config).resolve())
    notes = [f"config: {config}" + (f" + {' '.join(args.overrides)}" if args.overrides else ""), "layouts: " + ", ".join(layouts)]
    job = dataclasses.replace(
        job, args=("--config", config, *args.overrides), run_dir=str(Path(workdir, cfg.train.run_dir).resolve()),
        workdir=workdir, notes=tuple(notes),
    )  # fmt: skip
    return job, warnings


def launch_main(args: argparse.Namespace, extra: list[str], config_class: type) -> int:
    """`megarlhf launch`: exit 0 submitted / printed; 2 bad config, layout or option; 1 sbatch failed.
    `extra`: arguments argparse did not place (overrides after options)."""
    from megarlhf.config import DataError

    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        print(f"megarlhf launch: error: unrecognized arguments: {' '.join(bad)} (see megarlhf launch --help)", file=sys.stderr)
        return 2
    args.overrides = [*args.overrides, *extra]
    try:
        job, warnings = build_job(args, config_class)
    except (ConfigError, DataError, ValueError) as err:  # LayoutError is a ValueError
        print(f"megarlhf launch: error: {err}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"megarlhf launch: warning: {w}", file=sys.stderr)
    script = render(job)
    if args.dry_run:
        print(script, end="")
        return 0
    logs = Path(job.run_dir) / "logs"
    path = logs / f"{job.stage}.sbatch"
    try:
        logs.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
        path.write_text(script)
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        print("megarlhf launch: error: no sbatch here: run it where SLURM's clients are, or use --dry-run", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"megarlhf launch: error: cannot write the script to {path}: {err}", file=sys.stderr)
        return 1
    if out.returncode != 0:
        print(f"megarlhf launch: sbatch failed ({out.returncode}): {out.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = out.stdout.strip().split(";")[0]
    print(f"megarlhf launch: submitted {job.stage} as job {job_id}; script {path}; log {logs}/slurm-{job_id}.out", file=sys.stderr)
    print(job_id)  # alone on stdout, for scripts: ID=$(megarlhf launch ...)
    return 0


def write_generic_scripts(out_dir: str | Path) -> list[Path]:
    """launch/<stage>.sbatch for every stage: the generic renderings."""
    out = []
    for stage in GENERIC_STAGES:
        path = Path(out_dir) / f"{stage}.sbatch"
        path.write_text(render(SlurmJob(stage=stage)))
        path.chmod(0o755)
        out.append(path)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m megarlhf.launch OUT_DIR   (writes OUT_DIR/<stage>.sbatch)")
    for written in write_generic_scripts(sys.argv[1]):
        print(written)
