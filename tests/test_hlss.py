"""HLSS: attribute descriptions, the offline text encoder and its cached embeddings, the loss
against an independent computation, the alignment term's gradient, and HLSS / robust HLSS runs
that resume exactly and evaluate."""

from __future__ import annotations

import contextlib
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_train import Kill, kill_at, read_log, tiny_cfg, weights

from hsat import CLASSES, LEVELS
from hsat.errors import HSATError
from hsat.losses import alignment_loss, symmetric_kl
from hsat.methods import HLSS, Robust, build_objective, resolve_method
from hsat.methods.hlss import hlss_loss, split_outputs
from hsat.models import build_model, load_trained_model
from hsat.text import (
    TextEmbeddings, compute_text_embeddings, encode_sentences, ensure_text_embeddings, find_text_encoder,
    load_text_embeddings,
    read_descriptions, text_embeddings_name, write_text_embeddings,
)
from hsat.train import embed_views, pretrain

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SRH = ROOT / "config" / "attributes" / "srh.yaml"
SIZES = {"patient": 3, "slide": 4, "patch": 5}
DIM = 8


def fake_embeddings(path: Path, dim: int = DIM, sizes=SIZES, seed: int = 0) -> Path:
    """A small attribute-embeddings file (random unit vectors) for the training tests."""
    g = torch.Generator().manual_seed(seed)
    levels = {lvl: F.normalize(torch.randn(sizes[lvl], dim, generator=g), dim=-1) for lvl in LEVELS}
    markers = F.normalize(torch.randn(len(CLASSES), dim, generator=g), dim=-1)
    meta = {"classes": list(CLASSES), "attributes": {lvl: [f"{lvl}{i}" for i in range(n)] for lvl, n in sizes.items()},
            "markers": [{"class": c, "name": f"m_{c}"} for c in CLASSES], "descriptions": "fake", "encoder": "fake"}
    return write_text_embeddings(path, TextEmbeddings(levels, markers, meta))


def hlss_cfg(manifest, path, name="hlss", **hlss):
    return tiny_cfg(manifest, method={"name": name, "hlss": {"text_embeddings": str(path), **hlss}})


# ---------------------------------------------------------------------------------------------
# descriptions and the text encoder


def test_the_srh_descriptions_cover_every_class_and_level():
    d = read_descriptions(SRH, CLASSES)
    assert d.classes == CLASSES
    assert all(len(d.attributes[lvl]) >= 8 for lvl in LEVELS)
    assert {c for c, _, _ in d.markers} == set(CLASSES)


def _write(tmp_path, data) -> Path:
    p = tmp_path / "desc.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_bad_descriptions_name_the_file_and_what_is_missing(tmp_path):
    base = yaml.safe_load(SRH.read_text())
    with pytest.raises(HSATError, match=r"desc.yaml.*\['xyz'\]"):
        read_descriptions(_write(tmp_path, base), [*CLASSES, "xyz"])
    no_slide = {**base, "levels": {k: v for k, v in base["levels"].items() if k != "slide"}}
    with pytest.raises(HSATError, match=r"desc.yaml: levels.slide"):
        read_descriptions(_write(tmp_path, no_slide))
    no_markers = {**base, "markers": {k: v for k, v in base["markers"].items() if k != "lgg"}}
    with pytest.raises(HSATError, match=r"markers.lgg"):
        read_descriptions(_write(tmp_path, no_markers))
    with pytest.raises(HSATError, match="file not found"):
        read_descriptions(tmp_path / "absent.yaml")


def test_a_missing_encoder_names_the_paths_searched(tmp_path):
    with pytest.raises(HSATError, match=r"no text encoder found.*looked for: directory .*nowhere"):
        find_text_encoder(str(tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def srh_embeddings(tmp_path_factory) -> tuple[Path, list[int]]:
    """The real encoder on the SRH descriptions, with every socket connection refused (offline),
    computed once through the cache; the second call must not load the encoder."""
    import hsat.text as text

    cache = tmp_path_factory.mktemp("text")
    calls: list[int] = []
    real = text.encode_sentences

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def refuse(*a, **k):
        raise OSError("network access in a test")

    mp = pytest.MonkeyPatch()
    mp.setattr(text, "encode_sentences", counting)
    mp.setattr(socket.socket, "connect", refuse)
    try:
        first = ensure_text_embeddings(SRH, "all-MiniLM-L6-v2", cache, CLASSES)
        second = ensure_text_embeddings(SRH, "all-MiniLM-L6-v2", cache, CLASSES)
    finally:
        mp.undo()
    assert first == second
    return first, calls


def test_text_embeddings_load_offline_and_are_computed_once(srh_embeddings):
    path, calls = srh_embeddings
    assert len(calls) == 1
    emb = load_text_embeddings(path)
    d = read_descriptions(SRH)
    assert emb.sizes == {lvl: len(d.attributes[lvl]) for lvl in LEVELS}
    assert emb.markers.shape[0] == len(d.markers)
    for t in [*emb.levels.values(), emb.markers]:
        assert torch.allclose(t.norm(dim=-1), torch.ones(len(t)), atol=1e-5)
    assert path.name == text_embeddings_name(SRH, "all-MiniLM-L6-v2")
    assert emb.meta["descriptions_sha256"] == d.sha256


def test_a_file_that_is_not_text_embeddings_is_named(tmp_path):
    for body in (b"not safetensors at all", b"\xff" * 64):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(body)
        with pytest.raises(HSATError, match="bad.safetensors: not a text-embeddings file"):
            load_text_embeddings(bad)


def test_an_attribute_is_the_renormalised_mean_of_its_sentences(srh_embeddings):
    from hsat.text import encode_sentences

    emb = load_text_embeddings(srh_embeddings[0])
    d = read_descriptions(SRH)
    name, sentences = d.attributes["slide"][2]
    sent = encode_sentences(find_text_encoder("all-MiniLM-L6-v2"), sentences)
    expected = sent.mean(0) / sent.mean(0).norm()
    assert torch.allclose(emb.levels["slide"][2], expected, atol=1e-5), name
    # a paraphrase lies closer than an unrelated sentence: the encoder is the real model, not noise
    pair = encode_sentences(find_text_encoder("all-MiniLM-L6-v2"),
                            ["Tumour cells with large nuclei.", "Cells with enlarged nuclei.", "The train leaves at noon."])
    assert float(pair[0] @ pair[1]) > float(pair[0] @ pair[2]) + 0.2


def test_the_cache_key_follows_the_descriptions(tmp_path):
    changed = tmp_path / "srh.yaml"
    changed.write_text(SRH.read_text() + "\n# edited\n")
    assert text_embeddings_name(changed, "all-MiniLM-L6-v2") != text_embeddings_name(SRH, "all-MiniLM-L6-v2")


# ---------------------------------------------------------------------------------------------
# the loss


def _supcon_loop(z: torch.Tensor, groups: torch.Tensor, t: float) -> torch.Tensor:
    """SupCon written anchor by anchor (an independent computation)."""
    n = z.shape[0]
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in others)
        pos = [j for j in others if groups[j] == groups[i]]
        total += -sum(float(z[i] @ z[j]) / t - math.log(denom) for j in pos) / len(pos)
    return torch.tensor(total / n)


def _sym_kl_loop(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    out = 0.0
    for x, y in zip(a, b):
        p, q = torch.softmax(x / t, 0), torch.softmax(y / t, 0)
        out += float((p * (p / q).log()).sum() + (q * (q / p).log()).sum())
    return out / len(a)


def test_hlss_loss_matches_an_independent_computation():
    torch.manual_seed(0)
    p, s, k, v = 2, 2, 2, 2
    attrs = {lvl: F.normalize(torch.randn(n, DIM), dim=-1) for lvl, n in SIZES.items()}
    vis = F.normalize(torch.randn(p, s, k, v, DIM), dim=-1)
    scores = {lvl: vis @ attrs[lvl].T + 0.1 * torch.randn(p, s, k, v, SIZES[lvl]) for lvl in LEVELS}
    z = torch.cat([vis] + [scores[lvl] for lvl in LEVELS], dim=-1)
    out = hlss_loss(z, attrs, LEVELS, weights={"patient": 1.0, "slide": 0.5, "patch": 2.0}, alignment_weight=0.3,
                    alignment_temperature=0.2)
    idx = torch.arange(p * s * k * v).view(p, s, k, v)
    groups = {"patient": idx // (s * k * v), "slide": idx // (k * v), "patch": idx // v}
    expected_total = 0.0
    for lvl, w in {"patient": 1.0, "slide": 0.5, "patch": 2.0}.items():
        zn = F.normalize(scores[lvl], dim=-1).reshape(-1, SIZES[lvl])
        con = _supcon_loop(zn, groups[lvl].reshape(-1), 0.07)
        flat_v, flat_s = vis.reshape(-1, DIM), scores[lvl].reshape(-1, SIZES[lvl])
        nearest = torch.stack([attrs[lvl][int(r.argmax())] for r in flat_s])
        align = _sym_kl_loop(flat_v, nearest, 0.2)
        assert torch.allclose(out[f"supcon_{lvl}"], con, atol=1e-4), lvl
        assert abs(float(out[f"align_{lvl}"]) - align) < 1e-5, lvl
        expected_total += w * (float(con) + 0.3 * align)
    assert abs(float(out["total"]) - expected_total) < 1e-4


def test_hlss_noalign_drops_the_alignment_term(tmp_path):
    path = fake_embeddings(tmp_path / "text.safetensors")
    torch.manual_seed(0)
    z = torch.randn(2, 2, 2, 2, DIM + sum(SIZES.values()))
    losses = {}
    for name in ("hlss", "hlss_noalign"):
        obj = build_objective(resolve_method({"name": name, "hlss": {"text_embeddings": str(path), "alignment_weight": 1.0,
                                                                     "alignment_temperature": 0.1}}))
        losses[name] = obj.loss(z)
    aligned, plain = losses["hlss"], losses["hlss_noalign"]
    assert torch.allclose(plain["total"], sum(plain[f"supcon_{lvl}"] for lvl in LEVELS))
    assert float(aligned["total"]) > float(plain["total"])  # the same terms plus the alignment


def test_symmetric_kl_is_zero_only_for_equal_inputs():
    a = torch.randn(4, 6)
    assert float(symmetric_kl(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(symmetric_kl(a, a.flip(-1))) > 0


def _hlss_model(trainable=True):
    torch.manual_seed(0)
    return build_model("test_resnet", head_hidden=(32,), image_size=16,
                       hlss_head={"text_dim": DIM, "attributes": SIZES, "trainable_heads": trainable})


def test_initial_scores_are_cosine_similarities_to_the_attributes():
    model = _hlss_model()
    attrs = {lvl: F.normalize(torch.randn(n, DIM), dim=-1) for lvl, n in SIZES.items()}
    model.head.init_from_text(attrs)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        v, scores = split_outputs(model(x, output="hlss"), DIM, SIZES)
        assert torch.allclose(v, model(x), atol=1e-6)  # the `embedding` output is v itself
    for lvl in LEVELS:
        assert torch.allclose(scores[lvl], F.cosine_similarity(v[:, None], attrs[lvl][None], dim=-1), atol=1e-5)


def test_the_alignment_term_trains_the_backbone():
    model = _hlss_model()
    attrs = {lvl: F.normalize(torch.randn(n, DIM), dim=-1) for lvl, n in SIZES.items()}
    model.head.init_from_text(attrs)
    z = model(torch.rand(16, 3, 16, 16), output="hlss").view(2, 2, 2, 2, -1)
    v, scores = split_outputs(z, DIM, SIZES)
    align = alignment_loss(v.reshape(-1, DIM), scores["patch"].reshape(-1, SIZES["patch"]), attrs["patch"])
    align.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    # and with alignment_weight 0 the backbone's gradient is the contrastive one alone
    model.zero_grad()
    kw = dict(weights={}, alignment_temperature=0.1)
    z = model(torch.rand(16, 3, 16, 16), output="hlss").view(2, 2, 2, 2, -1)
    g0 = torch.autograd.grad(hlss_loss(z, attrs, LEVELS, alignment_weight=0.0, **kw)["total"], list(model.backbone.parameters()), retain_graph=True)
    g1 = torch.autograd.grad(hlss_loss(z, attrs, LEVELS, alignment_weight=1.0, **kw)["total"], list(model.backbone.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(g0, g1))


# ---------------------------------------------------------------------------------------------
# runs


def test_hlss_run_starts_from_the_text_and_resumes_exactly(tiny_manifest, tmp_path):
    path = fake_embeddings(tmp_path / "text.safetensors")
    cfg = hlss_cfg(tiny_manifest, path)
    cfg["augment"] = {"strength": 0.5}
    full = pretrain(cfg, tmp_path / "full")
    log = read_log(full)
    assert len(log) == 6 and all(f"loss_clean_align_{lvl}" in r and f"loss_clean_supcon_{lvl}" in r for r in log for lvl in LEVELS)
    saved = yaml.safe_load((full / "config.yaml").read_text())["method"]["hlss"]
    assert saved["text_dim"] == DIM and saved["attributes"] == SIZES
    with pytest.raises(Kill):
        pretrain(cfg, tmp_path / "killed", callback=kill_at(4))
    resumed = pretrain(cfg, tmp_path / "killed")
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the heads started from the attribute embeddings and trained away from them
    emb = load_text_embeddings(path)
    assert not torch.equal(a["head.levels.patch.weight"], emb.levels["patch"])


def test_frozen_heads_keep_the_attribute_embeddings(tiny_manifest, tmp_path):
    path = fake_embeddings(tmp_path / "text.safetensors")
    run = pretrain(hlss_cfg(tiny_manifest, path, trainable_heads=False), tmp_path / "run")
    emb, w = load_text_embeddings(path), weights(run)
    for lvl in LEVELS:
        assert torch.allclose(w[f"head.levels.{lvl}.weight"], emb.levels[lvl])


def test_robust_hlss_attack_raises_the_loss_it_trains_on(tiny_manifest, tmp_path):
    path = fake_embeddings(tmp_path / "text.safetensors")
    method = resolve_method({"name": "robust_hlss", "hlss": {"text_embeddings": str(path), "alignment_weight": 1.0,
                                                             "alignment_temperature": 0.1}})
    objective = build_objective(method)
    assert isinstance(objective, Robust) and isinstance(objective.inner, HLSS)
    model = _hlss_model()
    objective.setup(model, 1)
    objective.init_model(model)
    shape = (2, 2, 2, 2)
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        (z,) = embed_views(model, x, shape, contextlib.nullcontext, "hlss")
        clean = float(objective.attack_loss(z))
    attack = {"alpha": 2.0, "steps": 5, "random_start": True, "bn_mode": "eval", "only_adversarial": True}
    _, x_adv = objective.training_views(model, x, shape, attack=attack, eps=8.0, embed=embed_views,
                                        generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        (z_adv,) = embed_views(model, x_adv, shape, contextlib.nullcontext, "hlss")
        adv = float(objective.attack_loss(z_adv))
    assert adv > clean + 1e-3, (clean, adv)


def test_robust_hlss_run_evaluates(tiny_manifest, tmp_path):
    path = fake_embeddings(tmp_path / "text.safetensors")
    run = pretrain(hlss_cfg(tiny_manifest, path, name="robust_hlss"), tmp_path / "run")
    assert all("loss_adv_align_patch" in r for r in read_log(run))
    model = load_trained_model(run)  # the HLSS head rebuilt from config.yaml alone
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert model(x).shape == (4, DIM)
        assert model(x, output="hlss").shape == (4, DIM + sum(SIZES.values()))


def test_hlss_computes_its_embeddings_when_none_are_named(tiny_manifest, tmp_path, srh_embeddings, monkeypatch):
    """hsat pretrain without method.hlss.text_embeddings embeds the descriptions into the run
    directory (here the cache is pre-filled, so the encoder is not loaded again)."""
    cache = tmp_path / "run" / "text"
    cache.mkdir(parents=True)
    (cache / srh_embeddings[0].name).write_bytes(srh_embeddings[0].read_bytes())
    cfg = tiny_cfg(tiny_manifest, method={"name": "hlss", "hlss": {"descriptions": str(SRH)}})
    cfg["train"]["steps"] = 2
    run = pretrain(cfg, tmp_path / "run")
    saved = yaml.safe_load((run / "config.yaml").read_text())["method"]["hlss"]
    assert Path(saved["text_embeddings"]).name == srh_embeddings[0].name
    assert saved["text_dim"] == 384


def test_a_dataset_class_missing_from_the_embeddings_is_an_error(tiny_manifest, tmp_path):
    path = tmp_path / "text.safetensors"
    fake_embeddings(path)
    emb = load_text_embeddings(path)
    emb.meta["classes"] = [c for c in CLASSES if c != "schwan"]
    write_text_embeddings(path, emb)
    with pytest.raises(HSATError, match=r"text.safetensors.*\['schwan'\]"):
        pretrain(hlss_cfg(tiny_manifest, path), tmp_path / "run")


def _tiny_clip(path: Path, seed: int = 0) -> Path:
    """A random CLIP checkpoint (HLSS's reference encoder family) small enough for a test: a
    character-level BPE vocabulary, 2 text layers, a 16-d projection; saved as a user's would be."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    vocab.update({f"{chr(c)}</w>": len(vocab) + i for i, c in enumerate(range(33, 127))})
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval().save_pretrained(path)
    return path


def test_a_local_clip_text_tower_gives_clips_projected_embedding_offline(tmp_path, monkeypatch):
    """method.hlss.encoder may name a CLIP checkpoint a user has: its embedding is CLIP's (the
    end-of-text state through the text projection, as CLIP aligns it with images), from a whole
    CLIP directory and from the text tower saved alone, with every socket refused."""
    from transformers import CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    full = _tiny_clip(tmp_path / "clip")
    model = CLIPModel.from_pretrained(full).eval()
    tower_dir = tmp_path / "clip_text"
    tower = CLIPTextModelWithProjection(CLIPTextConfig(**{**model.config.text_config.to_dict(), "projection_dim": 16}))
    tower.text_model.load_state_dict(model.text_model.state_dict())
    tower.text_projection.load_state_dict(model.text_projection.state_dict())
    tower.save_pretrained(tower_dir)
    CLIPTokenizer.from_pretrained(full).save_pretrained(tower_dir)

    def refuse(*a, **k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    sentences = ["Dense sheets of atypical cells.", "Whorls of spindle cells.", "Dense sheets of atypical cells."]
    got = encode_sentences(full, sentences)
    assert got.shape == (3, 16)
    tok = CLIPTokenizer.from_pretrained(full)(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.text_model(**tok).last_hidden_state
        eos = (tok["input_ids"] == model.config.text_config.eos_token_id).int().argmax(dim=-1)
        expected = F.normalize(model.text_projection(hidden[torch.arange(3), eos]), dim=-1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(encode_sentences(tower_dir, sentences), got, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)

    emb = compute_text_embeddings(read_descriptions(SRH), str(full))
    assert emb.levels["patch"].shape[1] == 16 and emb.meta["encoder"] == str(full)


def test_compute_text_embeddings_rejects_an_unloadable_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    d = read_descriptions(SRH)
    with pytest.raises(HSATError, match="cannot load a text encoder from"):
        compute_text_embeddings(d, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# the interpretability evaluation and the CLI


def test_language_rows_cover_every_class_and_marker_and_the_attack_lowers_zero_shot_accuracy():
    from hsat.evaluate.language import LANGUAGE_COLUMNS, class_scores, language_rows, language_summary

    model = _hlss_model()
    torch.manual_seed(1)
    x = torch.rand(28, 3, 16, 16)
    y = torch.arange(7).repeat_interleave(4)
    markers = F.normalize(torch.randn(14, DIM), dim=-1)
    mcls = [c for c in CLASSES for _ in range(2)]
    names = [f"{c}{i}" for c in CLASSES for i in range(2)]
    with torch.no_grad():
        v = model(x)
    cfg = {"eps": 8.0, "alpha": 2.0, "steps": 5, "temperature": 0.07}
    info = {"model": "m", "method": "hlss", "group": "g", "seed": 0}
    df = language_rows(model, x, y, markers, mcls, names, list(CLASSES), cfg, info,
                       generator=torch.Generator().manual_seed(0))
    assert list(df.columns) == LANGUAGE_COLUMNS
    assert len(df) == 2 * 7 * 14 and set(df["condition"]) == {"clean", "pgd"}
    summ = language_summary(df).set_index("condition")
    clean_pred = class_scores(v, markers, torch.tensor([CLASSES.index(c) for c in mcls]), 7).argmax(1)
    assert summ.loc["clean", "zero_shot_acc"] == pytest.approx(100 * float((clean_pred == y).float().mean()))
    assert summ.loc["pgd", "zero_shot_acc"] <= summ.loc["clean", "zero_shot_acc"]
    # a class without markers is an error, not a silent gap
    with pytest.raises(HSATError, match="no markers"):
        language_rows(model, x, y, markers[:12], mcls[:12], names[:12], list(CLASSES), cfg, info)


def test_cli_text_embed_reports_a_bad_descriptions_file(tmp_path, capsys):
    from hsat.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [a]\nlevels: {patch: {x: [y]}}\n")
    assert main(["text-embed", "--descriptions", str(bad), "--out", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: levels.patient: missing" in err
    assert not (tmp_path / "t.safetensors").exists()


def test_cli_language_refuses_a_run_without_an_hlss_head(tiny_manifest, tmp_path, capsys):
    from hsat.cli import main

    run = pretrain(tiny_cfg(tiny_manifest, method={"name": "hidisc"}, train={"steps": 1}), tmp_path / "run")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"models": {"m": {"method": {"name": "hidisc"}}}}))
    code = main(["language", "--run", str(run), "--manifest", str(tiny_manifest), "--study", str(study), "--model", "m",
                 "--out", str(tmp_path / "l.csv")])
    assert code == 2 and "not an HLSS run" in capsys.readouterr().err
