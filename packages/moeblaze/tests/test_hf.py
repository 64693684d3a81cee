"""The Hugging Face adapter: a tiny random Mixtral / Qwen2-MoE (no download) gives the same
logits and gradients through moeblaze's experts as through transformers' own."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install 'moeblaze[hf]'); CI installs it")

import moeblaze.hf  # noqa: E402


def _tiny(kind, **extra):
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, **extra)
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
    model = _tiny("mixtral", hidden_act="gelu")  # the experts' act_fn is GELU
    with pytest.raises(ValueError, match="SiLU"):
        moeblaze.hf.use_moeblaze(model)
    with pytest.raises(ValueError, match="checkpoint"):
        moeblaze.hf.register(checkpoint="none")


def _experts_module(cls_path, config_name, **cfg):

    module_path, cls_name = cls_path.rsplit(".", 1)
    cls = getattr(pytest.importorskip(module_path), cls_name)
    return cls(getattr(transformers, config_name)(**cfg))


@pytest.mark.parametrize("cls_path, config_name, cfg", [
    # clamps gate and up with swiglu_limit inside its own _apply_gate
    ("transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4Experts", "DeepseekV4Config",
     dict(hidden_size=16, intermediate_size=24, num_local_experts=4, swiglu_limit=0.5)),
])
def test_adapter_refuses_experts_with_their_own_gate(cls_path, config_name, cfg):
    module = _experts_module(cls_path, config_name, **cfg)
    with pytest.raises(ValueError, match="_apply_gate"):
        moeblaze.hf.use_moeblaze(module)
    assert getattr(module.config, "_experts_implementation", None) != "moeblaze"


def test_adapter_refuses_an_own_gate_on_any_subclass_or_instance():
    model = _tiny("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts._apply_gate = lambda gate_up: gate_up.chunk(2, -1)[1]  # e.g. a patched-in variant
    with pytest.raises(ValueError, match="_apply_gate"):
        moeblaze.hf.use_moeblaze(model)


def test_adapter_judges_the_modules_own_activation():
    model = _tiny("mixtral")
    assert model.config.hidden_act == "silu"
    model.model.layers[1].mlp.experts.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="act_fn"):
        moeblaze.hf.use_moeblaze(model)


def test_swap_time_checks_match_the_forward():
    model = _tiny("mixtral")
    model.model.layers[0].mlp.experts.is_transposed = True  # e.g. AriaExperts
    with pytest.raises(ValueError, match="is_transposed"):
        moeblaze.hf.use_moeblaze(model)
    assert model.config._experts_implementation != "moeblaze"  # nothing swapped


def test_dense_mlp_models_are_skipped():
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)
    # Phi-3's dense MLP has nn.Linear gate_up_proj / down_proj and a config: not an experts module
    phi = transformers.Phi3ForCausalLM(transformers.Phi3Config(intermediate_size=40, pad_token_id=0, **common))
    assert moeblaze.hf.use_moeblaze(phi) == 0


def test_checkpoint_mode_is_per_model(monkeypatch):
    monkeypatch.setenv("GKC_BACKEND", "reference")
    seen = []
    real = moeblaze.hf.moe_experts
    monkeypatch.setattr(moeblaze.hf, "moe_experts", lambda *a: seen.append(a[-1]) or real(*a))
    torch.manual_seed(0)
    big, small = _tiny("mixtral"), _tiny("mixtral")
    moeblaze.hf.use_moeblaze(big, checkpoint="recompute")
    moeblaze.hf.use_moeblaze(small, checkpoint="full")
    ids = torch.randint(0, 64, (1, 4))
    big(ids)
    assert seen == ["recompute"] * 2
    seen.clear()
    small(ids)
    assert seen == ["full"] * 2
    with pytest.raises(ValueError, match="checkpoint"):
        moeblaze.hf.use_moeblaze(big, checkpoint="none")


def test_expert_parallel_shard_with_top_k_above_its_expert_count(monkeypatch):
    """Under transformers' expert parallelism a rank's experts module gets local ids (sentinel
    E_local for other ranks' experts) and the global top_k: 1 local expert with top-2 here."""
    moe = pytest.importorskip("transformers.integrations.moe")
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    monkeypatch.setenv("GKC_BACKEND", "reference")
    torch.manual_seed(0)
    experts = MixtralExperts(transformers.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=1,
                                                        num_experts_per_tok=2))
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    experts._is_expert_parallel = True  # what transformers' expert parallelism sets (sentinel ids skipped)
    moeblaze.hf.use_moeblaze(torch.nn.ModuleDict({"e": experts}))
    hs = torch.randn(5, 16, requires_grad=True)
    global_ids = torch.tensor([[0, 2], [3, 1], [0, 1], [2, 3], [1, 0]])  # 4 experts over 4 ranks; this is rank 0
    local_ids = torch.where(global_ids != 0, 1, 0)
    w = torch.rand(5, 2).masked_fill(global_ids != 0, 0.0).requires_grad_()
    params = [hs, w, experts.gate_up_proj, experts.down_proj]
    want = moe.batched_mm_experts_forward(experts, hs, local_ids, w)
    got = moeblaze.hf.moeblaze_experts_forward(experts, hs, local_ids, w)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    go = torch.randn_like(want)
    for g, r in zip(torch.autograd.grad(got, params, go), torch.autograd.grad(want, params, go)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
