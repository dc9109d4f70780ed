"""Configuration is data: YAML files validated against one JSON schema, with defaults filled in.

The study config (Snakemake's `config/*.yaml`) and the run config (`hsat pretrain --run-config`) share
`schemas/config.schema.yaml`; a run config is the study's `pretrain` section merged with one
model's overrides.
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jsonschema
import yaml

from hsat.errors import HSATError

SCHEMA_FILE = "config.schema.yaml"


@functools.cache
def load_schema() -> dict:
    text = resources.files("hsat").joinpath("schemas", SCHEMA_FILE).read_text(encoding="utf-8")
    return yaml.safe_load(text)


def schema_path() -> Path:
    """Filesystem path of the schema (for snakemake.utils.validate)."""
    return Path(str(resources.files("hsat").joinpath("schemas", SCHEMA_FILE)))


def _with_defaults(validator_class):
    """A validator that fills `default` values into objects as it validates (as Snakemake does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _subschema(which: str) -> dict:
    schema = load_schema()
    if which == "study":
        return schema
    if which not in schema["$defs"]:
        raise ValueError(f"unknown schema part {which!r}")
    return {"$defs": schema["$defs"], "$ref": f"#/$defs/{which}"}


def validate(cfg: Mapping[str, Any], which: str = "run", source: str = "config") -> dict:
    """Return a validated deep copy of `cfg` with defaults filled in.

    Raises HSATError listing every problem as `source: key.path: message`.
    """
    out = copy.deepcopy(dict(cfg))
    validator = _Validator(_subschema(which))
    # Fill defaults first (a pass may add nested objects whose own defaults need a second pass).
    for _ in range(4):
        before = repr(out)
        list(validator.iter_errors(out))
        if repr(out) == before:
            break
    errors = sorted(validator.iter_errors(out), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            where = ".".join(str(p) for p in e.absolute_path) or "<top>"
            lines.append(f"{source}: {where}: {e.message}")
        raise HSATError("invalid configuration\n  " + "\n  ".join(lines))
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HSATError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise HSATError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HSATError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
    """Recursively merge `override` into a copy of `base` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: Iterable[str]) -> dict:
    """Turn `["train.steps=10", "model.head_hidden=[256]"]` into a nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise HSATError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise HSATError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise HSATError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise HSATError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def load_run_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Read a run config (or start from defaults), apply key=value overrides, validate, resolve the method."""
    from hsat.methods import resolve_method  # local: the workflow imports this module, and methods import torch

    cfg = read_yaml(path) if path else {}
    cfg = deep_merge(cfg, parse_overrides(overrides))
    cfg = validate(cfg, "run", source=str(path) if path else "config")
    cfg["method"] = resolve_method(cfg["method"])
    return cfg


def load_study_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    cfg = deep_merge(read_yaml(path), parse_overrides(overrides))
    return validate(cfg, "study", source=str(path))


# ----------------------------------------------------------------------------- overlays

DEFAULT_STUDY = Path("config") / "config.yaml"
"""The default study, relative to the workflow's folder (the one holding the Snakefile)."""


def find_default_study(start: str | Path | None = None) -> Path:
    """The default study a command outside Snakemake overlays: `config/config.yaml` in `start` (the
    working directory), else in the nearest folder above it that holds the workflow (a Snakefile
    beside it), else in the checkout this hsat is imported from (an editable install)."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    if (here / DEFAULT_STUDY).is_file():
        return here / DEFAULT_STUDY
    checkout = Path(__file__).resolve().parents[2]
    for folder in (*here.parents, checkout):
        if (folder / DEFAULT_STUDY).is_file() and (folder / "Snakefile").is_file():
            return folder / DEFAULT_STUDY
    raise HSATError(f"the default study {DEFAULT_STUDY} is not in {here} nor in a workflow folder above it: "
                    "run from the workflow's folder or give --base PATH/TO/config/config.yaml")

MODEL_LISTS: tuple[tuple[str, ...], ...] = (
    ("evaluation", "transfer", "models"),
    ("evaluation", "sanity", "models"),
    ("evaluation", "whitebox", "autoattack", "models"),
    ("evaluation", "mil", "models"),
    ("evaluation", "language", "models"),
    ("evaluation", "attention", "models"),
    ("evaluation", "shift", "models"),
    ("tables", "table3_models"),
    ("tables", "table4_models"),
)
"""Lists of model names in a study; an overlay that replaces `models` and does not name a list
keeps the base's entries that are still models (empty = every model; for attention maps, every
model with a ViT backbone)."""


def _get(d: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(d, Mapping) or key not in d:
            return None
        d = d[key]
    return d


def _set(d: dict, path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
    d[path[-1]] = value


def apply_overlay(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict:
    """`base` changed by `overlay`: what the overlay names wins, everything else stays.

    Mappings merge key by key, except `models`, which an overlay replaces as a whole (a study is
    the models it names); the model lists of `MODEL_LISTS` then keep the base's entries that are
    still models, unless the overlay names the list itself.
    """
    out = deep_merge(base, {k: v for k, v in overlay.items() if k != "models"})
    if "models" in overlay:
        out["models"] = copy.deepcopy(dict(overlay["models"] or {}))
        for path in MODEL_LISTS:
            if _get(overlay, path) is None and isinstance(_get(base, path), list):
                _set(out, path, [m for m in _get(base, path) if m in out["models"]])
    return out


def leaf_paths(d: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Key paths of the leaves of a nested mapping (`models` entries count as leaves)."""
    out: set[tuple[str, ...]] = set()
    for key, value in d.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value and path[:1] != ("models",) or path == ("models",):
            out |= leaf_paths(value, path) if value else {path}
        else:
            out.add(path)
    return out


def set_paths(d: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Key paths of every value a mapping sets, inside `models` entries too (what `hsat config
    show` marks: the keys an overlay names, not the defaults filled in around them)."""
    out: set[tuple[str, ...]] = set()
    for key, value in d.items():
        path = (*prefix, str(key))
        out |= set_paths(value, path) if isinstance(value, Mapping) and value else {path}
    return out


def resolve_study(
    base: str | Path | Mapping[str, Any], overlays: Sequence[str | Path | Mapping[str, Any] | tuple] = (),
    overrides: Iterable[str] = (),
) -> tuple[dict, set[tuple[str, ...]]]:
    """The validated study: the base study changed by each overlay in turn, then key=value overrides.

    Each base or overlay is a YAML path, a mapping, or (mapping, name to quote). Returns (config
    with the schema's defaults filled in, key paths that the overlays and overrides set: each
    leaf, each `models` entry as a whole (`leaf_paths`) and the keys set inside it (`set_paths`)).
    Errors name the files and the key.
    """
    def load(x):
        if isinstance(x, (str, Path)):
            return read_yaml(x), str(x)
        if isinstance(x, tuple):  # (mapping, the name to quote in messages)
            return dict(x[0]), str(x[1])
        return dict(x), "config"

    cfg, source = load(base)
    named: set[tuple[str, ...]] = set()
    sources = [source]
    for item in overlays:
        layer, src = load(item)
        models = layer.get("models")
        if models is not None and not isinstance(models, Mapping):
            raise HSATError(f"{src}: models must map each model's name to its settings, "
                            f"not a {type(models).__name__} ({models!r:.60})")
        cfg = apply_overlay(cfg, layer)
        named |= leaf_paths(layer) | set_paths(layer)
        sources.append(src)
    extra = parse_overrides(overrides)
    if extra:
        # key=value changes one leaf: models.hsat_s0.seed=5 keeps the other models
        cfg = deep_merge(cfg, extra)
        named |= leaf_paths(extra) | set_paths(extra)
    source = " + ".join(sources)
    cfg = validate(cfg, "study", source=source)
    check_init_from(cfg, source)
    for spec in cfg["models"].values():  # a fine-tuned model's rows: a group of their own by default
        if spec.get("init_from") and "group" not in spec:
            spec["group"] = f"from {spec['init_from']}"
    # The shared run settings with the run defaults filled in, so the resolved study shows them.
    cfg["pretrain"] = validate(cfg["pretrain"], "run", source=f"{source}: pretrain")
    return cfg, named


def show_study(cfg: Mapping[str, Any], named: set[tuple[str, ...]], marker: str = "overlay") -> str:
    """YAML of a resolved study with `# <marker>` after every value an overlay set (exactly those:
    a default filled in beside them, in a model entry too, is not marked)."""
    lines: list[str] = []

    def emit(d, indent, prefix):
        for key, value in d.items():
            path = (*prefix, str(key))
            pad = "  " * indent
            if isinstance(value, Mapping) and value:
                mark = f"  # {marker}" if path in named else ""
                lines.append(f"{pad}{key}:{mark}")
                emit(value, indent + 1, path)
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
                text = text.removesuffix("\n...").strip()
                mark = f"  # {marker}" if path in named else ""
                lines.append(f"{pad}{key}: {text}{mark}")

    emit(cfg, 0, ())
    return "\n".join(lines) + "\n"


def resolve_evaluation(cfg_eval: Mapping[str, Any], source: str = "evaluation") -> dict:
    """A validated `evaluation` section with the schema's defaults filled in; library code then
    indexes it directly, so a default lives in the schema alone. Idempotent."""
    return validate(cfg_eval, "evaluation", source=source)


INHERITED_SETTINGS: tuple[tuple[str, str], ...] = (
    ("model", "backbone"), ("model", "backbone_args"), ("model", "factory"), ("model", "mean"), ("model", "std"),
    ("data", "image_size"), ("data", "resize"),
)
"""What a model with `init_from` takes from the model it starts from unless its own entry sets it:
the architecture its weights fit and the preprocessing they were made for (backbone_args merge
key by key)."""


def check_init_from(study: Mapping[str, Any], source: str = "config") -> None:
    """Every `init_from` names another model of the study, one that trains or imports an encoder,
    without a cycle, and a model that starts from it trains (HSATError naming the key and value)."""
    from hsat.methods import trains_encoder  # local: keeps torch out of the workflow's own process

    models = study.get("models") or {}
    if (study.get("pretrain") or {}).get("init_from"):
        raise HSATError(f"{source}: pretrain.init_from: set init_from in the model entries that start from "
                        "another model (models.NAME.init_from: OTHER)")
    for name, spec in models.items():
        chain = [name]
        while (init := (models.get(chain[-1]) or {}).get("init_from")) is not None:
            key = f"models.{chain[-1]}.init_from"
            if init not in models:
                raise HSATError(f"{source}: {key}: {init!r} is not a model of the study (have: {', '.join(models)})")
            if init in chain:
                raise HSATError(f"{source}: {key}: {init!r} starts a cycle ({' -> '.join([*chain, init])})")
            chain.append(init)
        if spec.get("init_from") is None:
            continue
        if not trains_encoder(spec.get("method") or {}):
            raise HSATError(f"{source}: models.{name}.init_from: {spec['init_from']!r}: method "
                            f"{(spec.get('method') or {}).get('name')!r} trains nothing to start from it "
                            "(give the fine-tuning model a training method, e.g. hsat)")
        own = spec.get("model") or {}
        for key in ("pretrained_path", "pretrained"):
            if own.get(key):
                raise HSATError(f"{source}: models.{name}: init_from {spec['init_from']!r} and model.{key} both "
                                "give the initial weights; keep one")


def _init_settings(study: Mapping[str, Any], model: str) -> dict:
    """The settings a model with `init_from` inherits (`INHERITED_SETTINGS`), its weights'
    origin (`init_from`: the source's name and run directory) and no other initial weights."""
    init = study["models"][model]["init_from"]
    source = run_config_for_model(study, init)
    out: dict = {"model": {"pretrained": False, "pretrained_path": None}}
    for section, key in INHERITED_SETTINGS:
        if source[section].get(key) is not None:
            out.setdefault(section, {})[key] = copy.deepcopy(source[section][key])
    out["init_from"] = {"model": init, "run": str(Path(study.get("results_dir", "results")) / "runs" / init)}
    return out


def run_config_for_model(study: Mapping[str, Any], model: str, manifest: str | None = None) -> dict:
    """The resolved run config of one model of the study matrix (a model with `init_from`: the
    source model's architecture settings under its own, `_init_settings`)."""
    if model not in study["models"]:
        raise HSATError(f"model {model!r} is not in the study config (have: {', '.join(study['models'])})")
    from hsat.methods import resolve_method  # local: keeps torch out of the workflow's own process

    overrides = {k: v for k, v in study["models"][model].items() if k not in ("group", "init_from")}
    base = study.get("pretrain", {})
    if study["models"][model].get("init_from") is not None:
        check_init_from(study)
        base = deep_merge(base, _init_settings(study, model))
    cfg = deep_merge(base, overrides)
    if manifest is not None:
        cfg = deep_merge(cfg, {"data": {"manifest": str(manifest)}})
    cfg = validate(cfg, "run", source=f"models.{model}")
    cfg["method"] = resolve_method(cfg["method"])
    hlss = cfg["method"].get("hlss")
    if hlss is not None and not hlss.get("text_embeddings"):
        hlss["text_embeddings"] = str(text_embeddings_file(study, hlss))
    return cfg


def text_embeddings_file(study: Mapping[str, Any], hlss: Mapping[str, Any]) -> Path:
    """Where the workflow caches the attribute embeddings of an HLSS model's descriptions and
    encoder (`hsat text-embed` writes it; the name is keyed by both)."""
    from hsat.text import text_embeddings_name  # local: keeps torch out of the workflow

    return Path(study.get("results_dir", "results")) / "text" / text_embeddings_name(hlss["descriptions"], hlss["encoder"])
