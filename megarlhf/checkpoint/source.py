"""The model a config starts from brings its shape and tokenizer: `init_from` / `sft_model_path`.

Layer: checkpoint/ (imports yaml, megarlhf.config and checkpoint.hf; no Megatron, so
`megarlhf launch` can resolve configs on a login node).

`apply_model_source(tree)` runs on the raw config tree (YAML + overrides, before the
dataclasses are built, so that what the user wrote can be told from defaults). When
`init_from` (SFT, RM, DPO) or `sft_model_path` (PPO, GRPO) names
  - a converted checkpoint (tools/convert_hf_to_megatron.py's OUT) or a run directory:
    the model section comes from its model_config.yaml / config.yaml, the tokenizer from its
    hf/ folder (or the run's own data.tokenizer, chat_template and special-token fields);
  - an HF model folder (`hf:PATH`, or PATH holding config.json but no checkpoint): the model
    section from config.json, the tokenizer from the folder; a bare PATH becomes `hf:PATH`,
each `model.*` and `data.*` key the user did not write is filled in. An explicit model.*
value that changes the architecture the weights need is a ConfigError naming both values.
A path that does not exist here (`megarlhf launch` on a login node), or holds no model, is
left to the trainer (whose checkpoint loader exits with code 3 and says what is missing).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
import yaml

from megarlhf.config import ConfigError, ModelConfig
from megarlhf.config.loader import build, convert_field

SOURCE_KEYS = ("init_from", "sft_model_path")
"""Config keys naming the model a stage starts from (the first one set is used)."""
ARCHITECTURE = ("arch", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "vocab_size", "rope_theta", "rope_scaling", "rope_scaling_factor", "norm_eps", "tie_embeddings",
                "add_qkv_bias")  # fmt: skip
"""Model fields the weights fix: an explicit different value is an error, not an override."""
DATA_KEYS = ("tokenizer", "chat_template", "bos_token", "eos_token", "pad_token")
"""data.* fields a run directory passes on to the stages that start from it."""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _run_dir(path: Path) -> Path | None:
    """The run directory of a run dir, its checkpoints/ folder or one iter_ folder."""
    if path.name == "checkpoints":
        path = path.parent
    elif path.name.startswith("iter_") and path.parent.name == "checkpoints":
        path = path.parent.parent
    if (path / "model_config.yaml").is_file() or (path / "config.yaml").is_file():
        return path
    return None


def model_source(path: str) -> tuple[str, ModelConfig, dict[str, str], str] | None:
    """(the path as the trainers load it, its ModelConfig, the data.* fields it brings,
    where the shape was read) for a converted checkpoint, a run directory or an HF folder;
    None for anything else (the trainer's checkpoint loader then says what is missing)."""
    from megarlhf.checkpoint import hf as mapping

    p = Path(path[3:] if path.startswith("hf:") else path)
    if path.startswith("hf:") or ((p / "config.json").is_file() and _run_dir(p) is None):
        cfg = mapping.model_config_from_hf(mapping.read_hf_config(p)).config
        return f"hf:{p}", cfg, ({"tokenizer": str(p)} if _has_tokenizer(p) else {}), str(p / "config.json")
    run_dir = _run_dir(p)
    if run_dir is None:
        return None
    data: dict[str, str] = {}
    for name, section in (("model_config.yaml", None), ("config.yaml", "model")):
        f = run_dir / name
        if f.is_file():
            tree = yaml.safe_load(f.read_text()) or {}
            cfg = build(ModelConfig, tree.get(section, {}) if section else tree, prefix=f"{f}: model.")
            origin = str(f)
            break
    run_config = run_dir / "config.yaml"
    if run_config.is_file():  # a stage's run: the data fields it was trained with
        run_data = (yaml.safe_load(run_config.read_text()) or {}).get("data") or {}
        data = {k: str(run_data[k]) for k in DATA_KEYS if run_data.get(k)}
    if _has_tokenizer(run_dir / "hf"):  # a converted checkpoint: the HF tokenizer files kept there
        data = {"tokenizer": str(run_dir / "hf")}
    return path, cfg, data, origin


def apply_model_source(tree: dict) -> None:
    """Fill the config tree's model and data sections from the model it starts from (in place)."""
    key = next((k for k in SOURCE_KEYS if tree.get(k)), None)
    if key is None or not Path(str(tree[key]).removeprefix("hf:")).exists():
        return  # nothing to read here (a path on the cluster seen from a login node): all explicit
    found = model_source(str(tree[key]))
    if found is None:
        return
    path, source, data, origin = found
    tree[key] = path
    model = tree.setdefault("model", {})
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping of ModelConfig fields, got {model!r}")
    for name in ARCHITECTURE:
        if name not in model:
            continue
        theirs = getattr(source, name)
        ours = convert_field(ModelConfig, name, model[name])
        if name == "num_query_groups":  # None = one group per head
            theirs, ours = source.query_groups, ours or _user_value(
                ModelConfig, "num_attention_heads", model.get("num_attention_heads", source.num_attention_heads))
        elif name == "ffn_hidden_size":  # None = the architecture's rule
            theirs, ours = source.ffn_size, ours or theirs
        if ours != theirs:
            raise ConfigError(
                f"model.{name} = {ours!r} conflicts with {key} = {tree[key]} ({origin} says {name} = {theirs!r}): "
                f"remove model.{name} to use the model's own, or start from a model of that shape"
            )
    for f in fields(ModelConfig):
        if f.init:
            model.setdefault(f.name, getattr(source, f.name))
    section = tree.setdefault("data", {})
    if isinstance(section, dict):
        for name, value in data.items():
            if not section.get(name):
                section[name] = value
