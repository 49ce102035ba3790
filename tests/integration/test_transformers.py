"""Hugging Face transformers models built from small configs with random weights (no download):
traced with keyword inputs, pruned, and returned in their own classes, so that
``save_pretrained`` / ``from_pretrained`` in a fresh process and ``generate()`` keep working."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import graphprune as gp

tf = pytest.importorskip("transformers", reason="the integration extra installs transformers")

SMALL = dict(vocab_size=128, max_position_embeddings=64)


def llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, **SMALL))


def gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0))


def bert():
    return tf.BertModel(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, **SMALL))


CASES = {
    # name: (factory, build options, module names to leave whole, fraction of parameters left at most)
    # hidden size, MLP, and whole KV groups with their query heads (GQA); head dims would change the
    # rotary frequencies a config rebuilds, so the module form keeps them whole
    "llama": (llama, {"factor": "heads"}, [], 0.35),
    "gpt2": (gpt2, {"factor": "heads"}, [], 0.35),  # GPT-2's config ties head size to n_embd / n_head
    "bert": (bert, {}, [f"encoder.layer.{i}.attention.self" for i in range(2)], 0.85),  # its config derives
}                                                     # the head size from hidden_size: only the MLP can go


def _inputs(name, batch=2, length=16):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (batch, length))
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return out if name == "bert" else {**out, "use_cache": False}


def _logits(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", list(CASES))
def test_prune_save_pretrained_from_pretrained_generate(name, tmp_path):
    factory, build, ignore, most = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    inputs = _inputs(name)
    dg = gp.DependencyGraph.build(model, inputs, **build)
    plan = gp.select(dg, gp.score("magnitude", model, dg), 0.5, ignore=ignore)
    graph = gp.apply(model, dg, plan)
    slim = gp.apply(model, dg, plan, output="module")
    assert type(slim) is type(model)
    left = sum(p.numel() for p in slim.parameters()) / sum(p.numel() for p in model.parameters())
    assert left <= most
    with torch.no_grad():
        torch.testing.assert_close(_logits(slim, inputs), graph(inputs["input_ids"], inputs["attention_mask"])[
            "logits" if name != "bert" else "last_hidden_state"])
    slim.save_pretrained(tmp_path)
    other = _inputs(name, batch=3, length=9)  # another batch size and sequence length
    with torch.no_grad():
        torch.save({"ids": other["input_ids"], "want": _logits(slim, other)}, tmp_path / "check.pt")
    script = f"""
import torch, transformers as tf
m = tf.{type(model).__name__}.from_pretrained({str(tmp_path)!r}).eval()
check = torch.load({str(tmp_path / 'check.pt')!r})
with torch.no_grad():
    out = m(input_ids=check["ids"], attention_mask=torch.ones_like(check["ids"]))
got = out.logits if hasattr(out, "logits") else out.last_hidden_state
diff = (got - check["want"]).abs().max().item()
gen = list(m.generate(check["ids"][:1, :4], max_new_tokens=3, do_sample=False).shape) if hasattr(m, "generate") \\
    and m.can_generate() else None
print(__import__("json").dumps({{"diff": diff, "gen": gen}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["diff"] < 1e-5
    if name != "bert":
        assert result["gen"] == [1, 7]


def test_head_dims_of_rotary_attention_are_refused_in_the_module_form():
    # LLaMA's config recomputes the rotary frequencies from head_dim: a slim head dim would reload
    # with other frequencies; the GraphModule keeps the original ones and stays exact
    torch.manual_seed(0)
    model = llama().eval()
    inputs = _inputs("llama")
    dg = gp.DependencyGraph.build(model, inputs)  # factor="largest": head dims are pruned
    plan = gp.select(dg, gp.score("magnitude", model, dg), 0.5)
    assert gp.verify(model, inputs, plan, dg=dg) is not None  # the graph form is fine
    with pytest.raises(gp.RewriteError):
        gp.apply(model, dg, plan, output="module")


def test_config_that_cannot_describe_the_widths_is_refused():
    # BERT derives its head size from hidden_size / num_attention_heads: pruning head dims cannot be
    # saved with its config, so the module form says so instead of returning a model that would
    # not reload
    torch.manual_seed(0)
    model = bert().eval()
    inputs = _inputs("bert")
    dg = gp.DependencyGraph.build(model, inputs)
    plan = gp.select(dg, gp.score("magnitude", model, dg), 0.5)
    with pytest.raises(gp.RewriteError, match="config cannot describe"):
        gp.apply(model, dg, plan, output="module")


def test_the_module_form_of_a_model_on_the_meta_device_takes_the_real_slim_weights():
    # structure without weights: the slim class and config come from a meta-device build (no
    # value is computed, nothing is allocated); the weights pruned elsewhere load into it
    torch.manual_seed(0)
    real = llama().eval()
    with torch.device("meta"):
        meta = llama().eval()
    inputs = _inputs("llama")
    dg_real = gp.DependencyGraph.build(real, inputs, factor="heads")
    dg_meta = gp.DependencyGraph.build(meta, inputs, factor="heads")
    plan = gp.select(dg_real, gp.score("magnitude", real, dg_real), 0.5)
    assert [g.size for g in dg_meta.groups] == [g.size for g in dg_real.groups]
    slim_real = gp.apply(real, dg_real, plan, output="module")
    slim_meta = gp.apply(meta, dg_meta, plan, output="module")
    assert type(slim_meta) is type(real) and all(p.is_meta for p in slim_meta.parameters())
    assert slim_meta.config.to_dict() == slim_real.config.to_dict()
    assert {k: v.shape for k, v in slim_meta.state_dict().items()} == \
        {k: v.shape for k, v in slim_real.state_dict().items()}
    again = type(real)(slim_meta.config).eval()  # the slim config, then the weights (e.g. streamed)
    again.load_state_dict(slim_real.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(_logits(again, inputs), _logits(slim_real, inputs))


@pytest.mark.parametrize("form", ["dict", "positional"])
def test_a_model_with_a_cache_prunes_as_the_user_calls_it(form):
    # no use_cache=False by hand: a forward that takes use_cache is traced without the cache,
    # whose widths would otherwise all be kept; the module form keeps the config's use_cache
    torch.manual_seed(0)
    model = llama().eval()
    ids = torch.randint(0, 128, (2, 16))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if form == "dict" else ids
    result = gp.prune(model, inputs, ratio=0.5, factor="heads")
    assert result.after.params / result.before.params < 0.35
    slim = gp.apply(model, result.graph, result.plan, output="module")
    assert slim.config.use_cache is True
    with torch.no_grad():
        got = result.model(**inputs) if form == "dict" else result.model(ids)
        torch.testing.assert_close(slim(ids, attention_mask=torch.ones_like(ids)).logits, got["logits"])
