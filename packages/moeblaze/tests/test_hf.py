"""The Hugging Face adapter: a tiny random Mixtral / Qwen2-MoE (no download) gives the same
logits and gradients through moeblaze's experts as through transformers' own."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install 'moeblaze[hf]'); CI installs it")

import moeblaze.hf  # noqa: E402


def _tiny(kind):
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=40, num_local_experts=5, num_experts_per_tok=2, **common)
        return transformers.MixtralForCausalLM(cfg)
    cfg = transformers.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                      num_experts=6, num_experts_per_tok=3, **common)
    return transformers.Qwen2MoeForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_moeblaze_experts_match_transformers(kind, backend, monkeypatch):
    monkeypatch.setenv("GKC_BACKEND", backend)
    torch.manual_seed(0)
    model = _tiny(kind).float()
    model.config._experts_implementation = "eager"  # transformers' own per-expert loop as the reference
    ids = torch.randint(0, 64, (2, 7))
    want = model(ids).logits
    want_grads = torch.autograd.grad(want.square().sum(), [p for n, p in model.named_parameters() if "experts" in n])
    assert moeblaze.hf.use_moeblaze(model) == 2
    assert model.config._experts_implementation == "moeblaze"
    got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    got_grads = torch.autograd.grad(got.square().sum(), [p for n, p in model.named_parameters() if "experts" in n])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_adapter_refuses_other_activations():
    model = _tiny("mixtral")
    model.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="SiLU"):
        moeblaze.hf.use_moeblaze(model)
    with pytest.raises(ValueError, match="checkpoint"):
        moeblaze.hf.register(checkpoint="none")
