"""Surgery: pruning units whose contribution was zeroed leaves the logits unchanged, for every family."""

import pytest
import torch
from tiny import FAMILIES, HEADS_MUST_DIVIDE_HIDDEN, VOCAB, random_plan, tiny_model

from transact.arch import get_adapter, shape_of
from transact.core.plan import PrunePlan
from transact.core.surgery import prune_
from transact.errors import TransactError

# hidden size, (heads, kv_heads) of the tiny model, kept (heads, kv_heads): MHA and GQA, kept head counts
# that do and do not divide the hidden size (LlamaConfig only accepts dividing ones; see arch/llama.py).
LAYOUTS = [
    pytest.param(64, 4, 4, 3, 3, id="mha-4to3"),
    pytest.param(64, 4, 4, 2, 2, id="mha-4to2"),
    pytest.param(64, 4, 2, 2, 1, id="gqa-4/2to2/1"),
    pytest.param(64, 4, 2, 2, 2, id="gqa-4/2to2/2"),
    pytest.param(90, 6, 2, 3, 1, id="gqa-6/2to3/1"),
    pytest.param(90, 6, 3, 4, 2, id="gqa-6/3to4/2"),
]


def _zero_pruned_units(model, plan):
    """Zero the o_proj columns of heads and down_proj columns of channels that the plan removes."""
    adapter = get_adapter(model)
    hd = plan.source.head_dim
    with torch.no_grad():
        for layer, kept in zip(adapter.layers(model), plan.layers, strict=True):
            attn = adapter.attention(layer, model.config)  # None in a linear-attention layer
            for h in set(range(plan.source.num_heads)) - set(kept.heads) if attn else ():
                attn.o.weight[:, h * hd:(h + 1) * hd] = 0
            mlp = adapter.mlp(layer, model.config)
            if kept.experts is None:
                dropped = sorted(set(range(plan.source.intermediate_size)) - set(kept.mlp))
                mlp.down.weight[:, dropped] = 0
                continue
            for e, channels in zip(kept.experts, kept.expert_mlp, strict=True):  # each expert its own channels
                mlp.down[e][:, sorted(set(range(plan.source.intermediate_size)) - set(channels))] = 0
            if mlp.shared is not None:
                mlp.shared.down.weight[:, sorted(set(range(plan.source.shared_expert_size)) - set(kept.mlp))] = 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("hidden", "heads", "kv", "keep_heads", "keep_kv"), LAYOUTS)
def test_pruning_zeroed_units_keeps_logits(family, hidden, heads, kv, keep_heads, keep_kv):
    model = tiny_model(family, heads=heads, kv_heads=kv, hidden=hidden, head_dim=16)
    if family in HEADS_MUST_DIVIDE_HIDDEN and hidden % keep_heads:
        with pytest.raises(TransactError, match=f"heads {keep_heads}: .* refuses head counts that do not divide"):
            random_plan(model, keep_heads, keep_kv, 40)
        return
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    dense = model(x).logits
    # every expert kept: dropping a routed expert changes the routing (see test_moe.py for that)
    plan = random_plan(model, keep_heads, keep_kv, 40, experts=shape_of(model).num_experts)
    _zero_pruned_units(model, plan)
    zeroed = model(x).logits
    assert not torch.allclose(dense, zeroed, atol=1e-3)  # the units mattered, so the check below has teeth
    prune_(model, plan)
    pruned = model(x).logits
    # Dropping all-zero columns changes only the order of float additions: equal to fp32 rounding.
    torch.testing.assert_close(pruned, zeroed, rtol=0, atol=2e-5)

    attn = next(a for a, _ in get_adapter(model).layer_parts(model) if a is not None)
    text = model.config.get_text_config()  # the config itself, or a multimodal model's language model's
    assert (text.num_attention_heads, text.num_key_value_heads) == (keep_heads, keep_kv)
    assert text.head_dim == 16 and get_adapter(model).mlp_width(text) == 40
    q_rows = 2 * 16 if family.startswith("qwen3_5") else 16  # Qwen3.5: each head's query and output gate
    assert attn.q.weight.shape == (keep_heads * q_rows, hidden) and attn.k.weight.shape == (keep_kv * 16, hidden)
    assert attn.o.weight.shape == (hidden, keep_heads * 16)
    if family == "qwen2":
        assert attn.q.bias.shape == (keep_heads * 16,) and attn.v.bias.shape == (keep_kv * 16,)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_generates_with_kv_cache(family):
    model = tiny_model(family, heads=6, kv_heads=2, hidden=96)
    prune_(model, random_plan(model, 4, 2, 48))
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    cached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(x, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 20) and torch.equal(cached, uncached)


def test_norms_embeddings_and_hidden_size_untouched():
    model = tiny_model("qwen3", tie=True)
    before = {n: p.clone() for n, p in model.named_parameters() if "norm" in n or "embed" in n}
    prune_(model, random_plan(model, 2, 1, 30))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())
    assert model.config.hidden_size == 64 and model.lm_head.weight is model.model.embed_tokens.weight


def test_plan_json_roundtrip_and_validation(tmp_path):
    model = tiny_model("llama", heads=6, kv_heads=3, hidden=96)
    plan = random_plan(model, 4, 2, 33)
    plan.save(tmp_path / "plan.json")
    again = PrunePlan.load(tmp_path / "plan.json")
    assert again == plan
    broken = plan.to_json()
    broken["layers"][0]["heads"] = [0, 1, 2, 5]  # head 5 is in group 2, two heads would come from group 0
    with pytest.raises(TransactError, match="per kept KV group"):
        PrunePlan.from_json(broken)
    wrong = tiny_model("llama", heads=4, kv_heads=2)
    with pytest.raises(TransactError, match="made for"):
        prune_(wrong, plan)


def test_same_plan_same_base_gives_identical_weights():
    plan = random_plan(tiny_model("qwen2"), 2, 1, 48, seed=5)
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    prune_(a, plan)
    prune_(b, plan)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
