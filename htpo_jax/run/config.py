"""The run configuration: one tree of frozen dataclasses, loaded from YAML plus `--set` overrides.

Sections: model, data, rollout, algorithm, optim, trainer, checkpoint, mesh, distributed.
Defaults are the paper's (its train.sh: Qwen3-8B-Base on DAPO-Math-17k). Everything is validated
before any work starts; a bad value or unknown key raises `ConfigError` with one line that names
the key and the allowed values or the nearest known key. `cli_config` turns that into a message
and exit status 2.

The config is never mutated at run time; derive a changed copy with `dataclasses.replace`.
`docs/CONFIG.md` is generated from the field help in `config_sections`
(`python -m htpo_jax.config --markdown`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from htpo_jax.run.config_sections import (
    SECTIONS,
    AlgorithmConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DistributedConfig,
    MeshConfig,
    ModelSection,
    OptimConfig,
    RolloutConfig,
    TrainerConfig,
    plain,
)

# The schema lives in config_sections; its classes are importable from here too.
__all__ = [
    "SECTIONS", "AlgorithmConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
    "DistributedConfig", "MeshConfig", "ModelSection", "OptimConfig", "RolloutConfig",
    "TrainerConfig", "add_config_args", "all_keys", "cli_config", "config_from_args",
    "config_from_dict", "config_markdown", "dump_yaml", "load_config", "load_tree",
    "parse_override",
]  # fmt: skip


class ConfigError(ValueError):
    """A config problem, described in one line that names the key."""


class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping that names one key twice (PyYAML would keep the last one silently)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping with a repeated key: in a config the second
    value would otherwise replace the first without a word."""

    def construct_mapping(self, node, deep=False):
        """The mapping of `node`; DuplicateKey when it names a key twice (`<<:` merges aside)."""
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` merges are overridden by the mapping's own keys, by design
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: construct_mapping reports it
                    continue
                if repeated:
                    raise DuplicateKey(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str):
    return yaml.load(text, Loader=UniqueKeyLoader)


def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _is_sub(tp) -> bool:
    """Whether a field's type is a nested sub-section (a dataclass, e.g. `model.lora`)."""
    return dataclasses.is_dataclass(tp)


def _leaf_keys(prefix: str, cls) -> list[str]:
    out = []
    for k, (_, tp) in _fields(cls).items():
        out += _leaf_keys(f"{prefix}.{k}", tp) if _is_sub(tp) else [f"{prefix}.{k}"]
    return out


def all_keys() -> list[str]:
    """Every config key as 'section.field' ('section.sub.field' in a sub-section such as
    `model.lora`), in schema order."""
    return [key for s, cls in SECTIONS.items() for key in _leaf_keys(s, cls)]


def _initials(name: str) -> str:
    return "".join(part[:1] for part in name.split("_"))


def _nearest(key: str) -> str | None:
    """The known key a typo most likely meant: same section first, then anywhere."""
    keys = all_keys()
    section, _, leaf = key.rpartition(".")
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]  # right name, wrong section
    if same_leaf:
        return same_leaf[0]
    if section in SECTIONS:
        leaves = list(_fields(SECTIONS[section]))
        # abbreviations first ('lr' -> learning_rate, 'rematerialize' -> remat), then spelling
        near = [
            k
            for k in leaves
            if leaf and (_initials(k) == leaf or k.startswith(leaf) or leaf.startswith(k))
        ]
        near = near or difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.6)
        if near:
            return f"{section}.{near[0]}"
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if near:
        return near[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)
    return by_leaf[near[0]] if near else None


# Keys that were renamed: the old name is still read, as the new one (a config that gives both
# is refused with one line).
RENAMED = {"trainer.logger": "trainer.loggers"}


def _renamed(section: str, body: dict) -> dict:
    """`body` (one section of a config tree) with old key names replaced by their new ones."""
    for old, new in RENAMED.items():
        s_old, _, leaf_old = old.partition(".")
        leaf_new = new.partition(".")[2]
        if s_old != section or leaf_old not in body:
            continue
        if leaf_new in body:
            raise ConfigError(f"{old} was renamed to {new}; give only {new}")
        body = {(leaf_new if k == leaf_old else k): v for k, v in body.items()}
    return body


def _unknown(key: str) -> ConfigError:
    near = _nearest(key)
    hint = f" (did you mean '{near}'?)" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check / convert one YAML value to the field's type; raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # YAML 1.1 reads a bare off / on (no quotes) as a bool: the choice of that name is meant
        if isinstance(value, bool) and ("off" if not value else "on") in allowed:
            value = "on" if value else "off"
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, str):  # `--set data.train_files=a.parquet` means a list of one
            value = [value]
        if value is None:
            value = []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(key, v, item_tp) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads '1e-6' (no dot) as a string; accept any number spelling.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf / .nan pass every range check below
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{key}: unsupported field type {_type_name(tp)}")


def config_from_dict(tree: dict | None, cross_checks: bool = True) -> Config:
    """Build and validate a Config from a nested dict (missing keys take their defaults).
    Every key's type and range is checked; `cross_checks=False` leaves out the checks between
    keys (batch sizes that divide, the overlong buffer under the response length, ...), for a
    tool that uses only some sections and checks those itself (evaluate)."""
    tree = tree or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(tree).__name__}")
    sections = {}
    for name, body in tree.items():
        if name not in SECTIONS:
            near = difflib.get_close_matches(str(name), list(SECTIONS), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown config section '{name}'{hint}")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {body!r}")
    for name, cls in SECTIONS.items():
        sections[name] = _build_section(name, cls, _renamed(name, tree.get(name) or {}))
    cfg = Config(**sections)
    if cross_checks:
        _cross_checks(cfg)
    return cfg


def _build_section(name: str, cls, body: dict):
    """One section (or nested sub-section such as `model.lora`) from its mapping, every key
    checked; `name` is its dotted key prefix."""
    known = _fields(cls)
    kwargs = {}
    for k, v in body.items():
        key = f"{name}.{k}"
        if k not in known:
            raise _unknown(key)
        f, tp = known[k]
        if _is_sub(tp):
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of keys, got {v!r}")
            kwargs[k] = _build_section(key, tp, v or {})
            continue
        v = _coerce(key, v, tp)
        check = f.metadata.get("check")
        if check is not None and not check[0](v):
            raise ConfigError(f"{key}: {check[1]}, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def _cross_checks(c: Config) -> None:
    def bad(key, msg):
        raise ConfigError(f"{key}: {msg}")

    if c.data.train_batch_size % c.optim.mini_batch_size:
        bad(
            "optim.mini_batch_size",
            f"must divide data.train_batch_size ({c.data.train_batch_size}), "
            f"got {c.optim.mini_batch_size}",
        )
    responses = c.optim.mini_batch_size * c.rollout.n
    if responses % c.optim.micro_batch_size:
        bad(
            "optim.micro_batch_size",
            f"must divide optim.mini_batch_size * rollout.n ({responses}), "
            f"got {c.optim.micro_batch_size}",
        )
    if c.algorithm.overlong_buffer_enable and (
        c.algorithm.overlong_buffer_len >= c.rollout.max_response_length
    ):
        bad(
            "algorithm.overlong_buffer_len",
            f"must be < rollout.max_response_length ({c.rollout.max_response_length}), "
            f"got {c.algorithm.overlong_buffer_len}",
        )
    if c.optim.warmup_steps > c.trainer.total_steps:
        bad("optim.warmup_steps", f"must be <= trainer.total_steps ({c.trainer.total_steps})")
    lora = c.model.lora
    if lora.base_dtype in ("int8", "nf4") and not lora.rank:
        bad(
            "model.lora.base_dtype",
            f"{lora.base_dtype} (a QLoRA base) needs model.lora.rank > 0: only adapters can be "
            "trained on a quantized base",
        )
    mesh = dataclasses.asdict(c.mesh)
    if sum(v == -1 for v in mesh.values()) > 1:
        bad("mesh", f"at most one axis may be -1, got {mesh}")
    if not c.trainer.output_dir.strip():
        bad("trainer.output_dir", "must not be empty")
    if len(set(c.trainer.loggers)) != len(c.trainer.loggers):
        bad("trainer.loggers", f"duplicate entries in {list(c.trainer.loggers)}")
    _check_storage_urls(c, bad)
    _check_async(c, bad)


def _check_async(c: Config, bad) -> None:
    """The asynchronous-RL keys that only mean something together."""
    r, t = c.rollout, c.trainer
    if r.placement == "separate" and t.async_mode == "off":
        bad("rollout.placement", "separate needs trainer.async_mode one_step or stream (with off "
            "the rollout devices would wait for every update), got off")  # fmt: skip
    if t.async_mode != "off" and r.engine != "paged":
        bad("trainer.async_mode", f"needs rollout.engine=paged, got {r.engine!r}")
    if t.async_mode != "off" and t.val_only:
        bad("trainer.async_mode", "must be off with trainer.val_only (nothing trains)")
    seg = r.segment_tokens
    if seg > r.max_response_length:
        cap = r.max_response_length
        bad("rollout.segment_tokens", f"must be <= rollout.max_response_length ({cap}), got {seg}")


def _check_storage_urls(c: Config, bad) -> None:
    """gs:// is the one URL scheme for checkpoints; logs stay on local disk (appended per step)."""
    if "://" in c.trainer.output_dir:
        bad(
            "trainer.output_dir",
            f"must be a local directory (metrics.jsonl is appended every step), got "
            f"{c.trainer.output_dir!r}; put checkpoints on Cloud Storage with "
            f"checkpoint.dir=gs://BUCKET/PATH",
        )
    if "://" in c.checkpoint.dir and not c.checkpoint.dir.startswith("gs://"):
        bad("checkpoint.dir", f"only gs:// URLs or local paths, got {c.checkpoint.dir!r}")
    # a mistyped URL such as gs:/b, possibly made absolute by the path resolution above
    if "gs:/" in c.checkpoint.dir and "gs://" not in c.checkpoint.dir:
        bad("checkpoint.dir", f"a Cloud Storage URL is gs://BUCKET/PATH, got {c.checkpoint.dir!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', c parsed as a YAML scalar / flow value)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except DuplicateKey as e:
        raise ConfigError(f"override '{text}': {e.problem}") from None
    except yaml.YAMLError:
        value = raw  # an unparsable value is taken literally; its field then judges it
    return key, value


def _apply(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in SECTIONS and isinstance(value, dict):
        tree.setdefault(parts[0], {}).update(value)
        return
    key = RENAMED.get(key, key)  # an override of the old name sets the new key
    if key not in all_keys():
        raise _unknown(key)
    *outer, leaf = key.split(".")
    body = tree
    for part in outer:  # section, then any sub-section (model.lora.rank)
        if body.get(part) is None:
            body[part] = {}
        body = body[part]
    for old_key, new_key in RENAMED.items():  # this override replaces the old name's value too
        old_outer, _, old_leaf = old_key.rpartition(".")
        if new_key == key and old_outer == ".".join(outer):
            body.pop(old_leaf, None)
    body[leaf] = value


def load_config(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    *,
    cross_checks: bool = True,
) -> Config:
    """Defaults, then the YAML file (if any, on top of its `base:` chain), then `a.b=c` overrides
    in order; validated (`cross_checks`: see `config_from_dict`)."""
    return config_from_dict(load_tree(path, overrides, cross_checks=cross_checks), cross_checks)


def load_tree(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    *,
    cross_checks: bool = True,
) -> dict:
    """What `load_config` builds its Config from: the keys the file chain and the overrides
    set (nothing for defaults), paths made absolute; the file is validated, the overrides not
    yet. A tool tells from it which keys the user chose."""
    tree: dict = {}
    if path is not None:
        # validated: file problems before overrides
        tree = _read_config_file(Path(path), (), cross_checks)
    for text in overrides:
        _apply(tree, *parse_override(text))
    _resolve_paths(tree, Path.cwd())  # paths from --set: relative to where the user is
    if not isinstance(tree.get("trainer"), dict) or "output_dir" not in tree["trainer"]:
        default = TrainerConfig.output_dir  # the one path with a default: where the user is too
        tree["trainer"] = {**(tree.get("trainer") or {}), "output_dir": str(Path.cwd() / default)}
    return tree


def _read_config_file(p: Path, chain: tuple[Path, ...], cross_checks: bool = True) -> dict:
    """One YAML file as a tree of sections, its relative paths made absolute against its own
    directory, merged key by key over its `base:` file (itself read the same way). `chain` holds
    the files that include this one, to stop a cycle."""
    if not p.is_file():
        if chain:
            raise ConfigError(f"{chain[-1]}: base file not found: {p}")
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in chain:
        cycle = " -> ".join(str(c) for c in (*chain, p.resolve()))
        raise ConfigError(f"{chain[-1]}: base files form a cycle: {cycle}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{p}: line {line} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the "
            "file as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror or e})") from None
    try:
        tree = _yaml_load(text) or {}
    except DuplicateKey as e:
        line = e.problem_mark.line + 1
        raise ConfigError(f"{p}: line {line}: {e.problem}; each key may appear once") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} is not valid YAML") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    # old key names -> new ones per file, so a file's new name overrides its base's old one
    tree = {k: (_renamed(k, v) if isinstance(v, dict) else v) for k, v in tree.items()}
    base = tree.pop("base", None)
    _resolve_paths(tree, p.resolve().parent)
    if base is not None:
        tree = _merge_base(p, base, tree, chain, cross_checks)
    try:
        config_from_dict(tree, cross_checks)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return tree


def _merge_base(p: Path, base, tree: dict, chain: tuple[Path, ...], cross_checks: bool) -> dict:
    """`tree` (file `p`, whose `base:` key was `base`) merged over its base file's tree."""
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{p}: base: expected a YAML file name, got {base!r}")
    under = _read_config_file(
        p.resolve().parent / os.path.expanduser(base), (*chain, p.resolve()), cross_checks
    )
    for name, body in tree.items():  # sections merge key by key; this file's values win
        if isinstance(body, dict) and isinstance(under.get(name), dict):
            body = {**under[name], **body}
        elif body is None and name in under:
            continue
        under[name] = body
    return under


# Keys that name files or directories. Relative values resolve against the config file's
# directory (or the working directory for --set), so a run and its saved config.yaml work from
# anywhere. URLs (gs://, s3://, ...) and empty values are left as they are.
PATH_KEYS = (
    "model.path",
    "model.tokenizer_path",
    "data.train_files",
    "data.val_files",
    "trainer.output_dir",
    "checkpoint.dir",
)


def _abs_path(value, base: Path):
    if not isinstance(value, str) or not value or "://" in value:
        return value
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base / p)


def _resolve_paths(tree: dict, base: Path) -> None:
    for key in PATH_KEYS:
        section, leaf = key.split(".")
        body = tree.get(section)
        if not isinstance(body, dict) or leaf not in body:
            continue
        v = body[leaf]
        if isinstance(v, list | tuple):
            body[leaf] = [_abs_path(x, base) for x in v]
        else:
            body[leaf] = _abs_path(v, base)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Adds `--config FILE` and `--set KEY=VALUE ...` (into `overrides`) to `parser`."""
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override keys, e.g. --set optim.learning_rate=1e-6 trainer.total_steps=5",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """load_config from parsed `add_config_args` arguments; on ConfigError print and exit 2."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def cli_config(argv: typing.Sequence[str] | None = None, description: str | None = None) -> Config:
    """Parse `--config PATH --set k=v ...` from argv; a bad config exits 2 with one line."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    return config_from_args(parser.parse_args(argv))


def dump_yaml(cfg: Config) -> str:
    """The config as YAML text, keys in schema order."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _doc_type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_doc_type(typing.get_args(tp)[0])}"
    if isinstance(tp, types.GenericAlias):
        return str(tp)
    return tp.__name__


def config_markdown() -> str:
    """docs/CONFIG.md: every key, its type, default and meaning."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `python -m htpo_jax.config --markdown > docs/CONFIG.md`; do not edit.",
        "",
        "Set keys in a YAML file (`--config run.yaml`, sections as top-level mappings) or on the",
        "command line (`--set section.key=value`, the value read as YAML). Defaults are the",
        "paper's (train.sh of the official implementation: Qwen3-8B-Base on DAPO-Math-17k).",
        "Unknown keys and bad values stop the run before any work, naming the key.",
        "",
        "A file can start from another: `base: other.yaml` (relative to the including file; the",
        "base must be a valid config itself) takes every key of `other.yaml`, then this file's",
        "keys replace the base's one by one (a section is merged, not replaced). Relative paths",
        "resolve against the directory of the file that wrote them. `configs/dapo_baseline.yaml`",
        "is the paper run with `base:` and three keys.",
        "",
    ]
    for name, cls in SECTIONS.items():
        lines += [f"## `{name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += _markdown_rows(name, cls)
        lines.append("")
    return "\n".join(lines)


def _markdown_rows(prefix: str, cls) -> list[str]:
    """One table row per key of a section, nested sub-sections' keys spelled out in place."""
    rows = []
    for k, (f, tp) in _fields(cls).items():
        if _is_sub(tp):
            rows += _markdown_rows(f"{prefix}.{k}", tp)
            continue
        default = yaml.safe_dump(plain(f.default), default_flow_style=True).strip()
        default = default.removesuffix("\n...").removesuffix("...").strip()
        help_text = f.metadata["help"]
        if f.metadata.get("check"):
            help_text += f" ({f.metadata['check'][1].replace('must be ', '')})"
        rows.append(f"| `{prefix}.{k}` | {_doc_type(tp)} | `{default}` | {help_text} |")
    return rows


def main(argv: typing.Sequence[str] | None = None) -> None:
    """Print the resolved config as YAML (or the markdown reference with --markdown)."""
    parser = argparse.ArgumentParser(description="Validate a config and print it resolved.")
    add_config_args(parser)
    parser.add_argument("--markdown", action="store_true", help="print docs/CONFIG.md")
    args = parser.parse_args(argv)
    if args.markdown:
        print(config_markdown(), end="")
        return
    print(dump_yaml(config_from_args(args)), end="")


if __name__ == "__main__":
    main()
