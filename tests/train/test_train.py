"""Training recipe: a --quick run writes valid checkpoints, and the training model's inference forward on the saved
weights equals an independent per-token numpy computation of the upstream EMO semantics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emo_edge.model.checkpoint import CheckpointView
from emo_edge.data import CALIB_DOMAINS, HELDOUT_DOMAINS, calib_texts, heldout_texts
from emo_edge.model.spec import load_spec


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from emo_edge.train.__main__ import main

    root = tmp_path_factory.mktemp("train")
    assert main(["--quick", "--work", str(root / "work"), "--out", str(root / "models")]) == 0
    return root


def test_quick_run_writes_valid_checkpoints(quick_run):
    for name in ("emo-tiny", "stdmoe-tiny"):
        d = quick_run / "models" / name
        view = CheckpointView(d)
        assert view.dtype == "BF16"
        assert view.spec.layers[0].routing == "shared" and view.spec.top_k == 3
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md", "config.json"):
            assert (d / f).is_file(), f
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "emo" and cfg["num_shared_experts"] == 1 and cfg["norm_topk_prob"] is False
        assert "python -m emo_edge.train --quick" in (d / "README.md").read_text()
        view.close()
    res = json.loads((quick_run / "work" / "emo-tiny.result.json").read_text())
    assert (res["pretrain_steps"], res["anneal_steps"], res["steps"]) == (4, 3, 7) and np.isfinite(res["final_train_ce"])


# ---- independent reference: plain numpy, one token at a time ---------------------------------------------------
def _bf16_weights(path):
    view = CheckpointView(path)
    w = {name: view.tensor(name).numpy().astype(np.float64) for name in view.tensors}
    spec = view.spec
    view.close()
    return spec, w


def _reference_logits(spec, w, ids):
    """Per-token loop following the upstream modeling_emo semantics (no KV tricks, no vectorised routing)."""
    H, nh, nkv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    E = spec.layers[0].num_experts
    k_routed = spec.top_k - 1
    eps = spec.rms_norm_eps

    def rms(x, g):
        return g * x / np.sqrt(np.mean(x * x) + eps)

    def rope(v, p):  # v (hd,)
        half = hd // 2
        out = np.empty_like(v)
        for i in range(half):
            ang = p / spec.rope_theta ** (2 * i / hd)
            c, s = np.cos(ang), np.sin(ang)
            out[i] = v[i] * c - v[i + half] * s
            out[i + half] = v[i + half] * c + v[i] * s
        return out

    def silu(z):
        return z / (1 + np.exp(-z))

    T = len(ids)
    x = [w["model.embed_tokens.weight"][t].copy() for t in ids]
    for li in range(spec.num_layers):
        p = f"model.layers.{li}."
        qs, ks, vs = [], [], []
        for t in range(T):
            h = rms(x[t], w[p + "pre_attention_layernorm.weight"])
            q = (w[p + "self_attn.q_proj.weight"] @ h).reshape(nh, hd)
            k = (w[p + "self_attn.k_proj.weight"] @ h).reshape(nkv, hd)
            v = (w[p + "self_attn.v_proj.weight"] @ h).reshape(nkv, hd)
            qs.append([rope(q[a], t) for a in range(nh)])
            ks.append([rope(k[a], t) for a in range(nkv)])
            vs.append(v)
        new = []
        for t in range(T):
            heads = []
            for a in range(nh):
                g = a // (nh // nkv)
                scores = np.array([qs[t][a] @ ks[s][g] / np.sqrt(hd) for s in range(t + 1)])
                pr = np.exp(scores - scores.max())
                pr /= pr.sum()
                heads.append(sum(pr[s] * vs[s][g] for s in range(t + 1)))
            hcur = x[t] + w[p + "self_attn.o_proj.weight"] @ np.concatenate(heads)
            m = rms(hcur, w[p + "pre_feedforward_layernorm.weight"])
            logits = w[p + "mlp.gate.weight"] @ m
            routed = np.exp(logits[:-1] - logits[:-1].max())
            routed /= routed.sum()
            chosen = sorted(range(E - 1), key=lambda e: -routed[e])[:k_routed]
            out = np.zeros(H)
            for e, weight in [(e, routed[e]) for e in chosen] + [(E - 1, 1.0)]:
                q = f"{p}mlp.experts.{e}."
                out += weight * (w[q + "down_proj.weight"] @ (silu(w[q + "gate_proj.weight"] @ m) * (w[q + "up_proj.weight"] @ m)))
            new.append(hcur + out)
        x = new
    return np.stack([w["lm_head.weight"] @ rms(v, w["model.norm.weight"]) for v in x])


def test_training_model_matches_reference_on_saved_weights(quick_run):
    from emo_edge.train.loop import load_checkpoint_model

    path = quick_run / "models" / "emo-tiny"
    spec, w = _bf16_weights(path)
    model = load_checkpoint_model(path)
    ids = [5, 17, 200, 3, 0, 99, 42, 311, 7, 64, 12, 1]
    with torch.no_grad():
        got, _ = model(torch.tensor([ids]))
    ref = _reference_logits(spec, w, ids)
    np.testing.assert_allclose(got[0].double().numpy(), ref, rtol=1e-4, atol=1e-4)
    # packed rows (segments) give the same logits as running each document alone
    a, b = ids[:5], ids[5:]
    seg = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        packed, _ = model(torch.tensor([ids]), pos=pos, seg=seg, mode="full")
        alone_b, _ = model(torch.tensor([b]))
    torch.testing.assert_close(packed[0, :5], got[0, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, 5:], alone_b[0], rtol=1e-5, atol=1e-5)
    assert load_spec(path).vocab_size == got.shape[-1]


def test_emo_pool_routing_masks_experts():
    from emo_edge.train.model import ModelConfig, TinyEmo

    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=8,
                      num_experts=9, top_k=3)
    model = TinyEmo(cfg)
    model.init_weights(0)
    moe = model.layers[0].moe
    seen = {}
    orig = moe.expert

    def spy(j, x):
        seen[j] = seen.get(j, 0) + x.shape[0]
        return orig(j, x)
    moe.expert = spy
    model.train()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    seg = torch.zeros(1, 40, dtype=torch.long)
    model(ids, seg=seg, mode="emo", pool_range=(2, 2), gen=torch.Generator().manual_seed(0))
    routed = {j for j in seen if j != 8}
    assert len(routed) == 2 and seen[8] == 40  # a pool of 2 routed experts; the shared one sees every token


def test_committed_data_sets():
    for d in CALIB_DOMAINS:
        assert len(calib_texts(d)) >= 20
    for d in HELDOUT_DOMAINS:
        texts = heldout_texts(d)
        assert texts and sum(map(len, texts)) < 300_000


class _Stop(Exception):
    pass


def _stopped_then_resumed(cfg, work, out, at: str) -> list[str]:
    """train_one stopped at the log line containing `at`, then run again with the same work directory into
    `out`; returns the second run's log lines."""
    from emo_edge.train.loop import train_one

    def stop(msg):
        if at in msg:
            raise _Stop

    with pytest.raises(_Stop):
        train_one("emo", cfg, work, out, "test", log=stop)
    seen = []
    train_one("emo", cfg, work, out, "test", log=seen.append)
    return seen


def test_training_resumes_to_the_same_weights(tmp_path):
    """A run stopped after step 2 and started again finishes with exactly the weights of an uninterrupted run:
    model, optimizer, data order and routing draws all come back from the saved state (safetensors + JSON)."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from emo_edge.train.config import quick_config
    from emo_edge.train.loop import train_one
    from emo_edge.train.prepare import prepare_data

    cfg = replace(quick_config(), ckpt_minutes=0.0)
    work = tmp_path / "work"
    prepare_data(cfg, work, log=lambda m: None)

    def weights(out):
        return load_file(str(out / "emo-tiny" / "model.safetensors"))

    train_one("emo", cfg, work, tmp_path / "a", "test", log=lambda m: None)
    import shutil
    for f in work.glob("emo-tiny*"):  # states, the pretrained checkpoint and its record: a run from scratch
        if f.name.endswith((".state", "-pretrained", "-latest")) or ".state." in f.name:
            shutil.rmtree(f)
        elif f.name.endswith("-pretrained.json"):
            f.unlink()

    seen = _stopped_then_resumed(cfg, work, tmp_path / "b", "step 3/")
    assert any("resumed" in m and "step 2/4" in m for m in seen), seen
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_anneal_stage_resumes_and_reuses_the_pretrained_checkpoint(tmp_path):
    """A run stopped inside the anneal stage continues there: pretraining is not repeated (its checkpoint, as
    written, is reused), the anneal state comes back, and the weights equal an uninterrupted run's; an anneal run
    starts from exactly the pretrained checkpoint as written (bf16)."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from emo_edge.train.config import quick_config
    from emo_edge.train.loop import train_one
    from emo_edge.train.prepare import prepare_data

    cfg = replace(quick_config(), ckpt_minutes=0.0)
    work = tmp_path / "work"
    prepare_data(cfg, work, log=lambda m: None)
    train_one("emo", cfg, work, tmp_path / "a", "test", log=lambda m: None)
    pre = load_file(str(work / "emo-tiny-pretrained" / "model.safetensors"))
    import shutil
    for f in work.glob("emo-tiny-anneal*"):
        shutil.rmtree(f) if f.is_dir() else f.unlink()

    seen = _stopped_then_resumed(cfg, work, tmp_path / "b", "step 6/7")
    assert any("pretraining done" in m for m in seen), seen
    assert any("resumed" in m and "step 5/7" in m for m in seen), seen
    assert not any("[emo-tiny] step" in m for m in seen), "pretraining ran again"
    a = load_file(str(tmp_path / "a" / "emo-tiny" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "emo-tiny" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], pre[k]) for k in a), "the anneal stage changed nothing"
