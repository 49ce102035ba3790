"""Streaming a sharded Hugging Face checkpoint: scores and the slim checkpoint, one tensor at a time,
against the same steps on the model loaded in memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import graphprune as gp

tf = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

INPUTS = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}


def _config():
    return tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          use_cache=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny tied LLaMA saved in several shards, its graph on meta and on the real model."""
    torch.manual_seed(0)
    real = tf.LlamaForCausalLM(_config()).eval()
    src = tmp_path_factory.mktemp("llama")
    real.save_pretrained(src, max_shard_size="20KB")
    assert len(list(src.glob("model-*-of-*.safetensors"))) >= 3
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(_config()).eval()
    with pytest.warns(UserWarning):
        meta_dg = gp.DependencyGraph.build(meta, INPUTS, factor="heads")
        real_dg = gp.DependencyGraph.build(real, INPUTS, factor="heads")
    return real, real_dg, meta, meta_dg, src


def _group(dg, size, member):
    return next(g.id for g in dg.groups if g.size == size and any(m.param == member for m in g.members))


def _uniform_plan(dg):
    """The same count removed in every layer (so the config can express it), other indices each layer."""
    hidden = _group(dg, 32, "model.norm.weight")
    plan = {hidden: [1, 4, 9, 16, 20, 25, 30, 31]}
    for layer, heads, mlp in ((0, [0], list(range(0, 48, 2))), (1, [1], list(range(1, 48, 2)))):
        plan[_group(dg, 2, f"model.layers.{layer}.self_attn.k_proj.weight")] = heads
        plan[_group(dg, 48, f"model.layers.{layer}.mlp.up_proj.weight")] = mlp
    return gp.Plan(plan)


def _read(directory):
    state = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        state.update(safetensors_torch.load_file(str(file)))
    return state


@pytest.mark.parametrize("method, options", [("magnitude", {}), ("magnitude", {"p": 1}), ("l1", {}),
                                             ("l2", {"normalize": "max"}), ("magnitude", {"roles": ("out",)})])
def test_streamed_scores_equal_the_in_memory_ones(llama, method, options):
    real, real_dg, _, meta_dg, src = llama
    streamed = gp.score_checkpoint(method, src, meta_dg, **options)
    in_memory = gp.score(method, real, real_dg, **options)
    assert sorted(streamed) == sorted(in_memory) and len(streamed) >= 5
    for gid in in_memory:
        assert np.array_equal(streamed[gid], in_memory[gid]), gid
    # the embedding (tied to lm_head, which the file leaves out) is scored under the name the file has
    assert "lm_head.weight" not in json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]


def test_slim_checkpoint_is_the_in_memory_slim_model_and_loads_with_from_pretrained(llama, tmp_path):
    real, real_dg, meta, meta_dg, src = llama
    plan = _uniform_plan(meta_dg)
    out = tmp_path / "slim"
    written = gp.apply_checkpoint(meta, meta_dg, plan, src, out)
    module = gp.apply(real, real_dg, plan, output="module")
    want = module.state_dict()
    got = _read(out)
    assert set(got) == set(want) - {"lm_head.weight"}  # the tie stays a tie
    for name, t in got.items():
        assert torch.equal(t, want[name]), name
    # shard by shard: every output shard holds the sliced tensors of its input shard
    index_in = json.loads((src / "model.safetensors.index.json").read_text())
    index_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert index_out["weight_map"] == index_in["weight_map"]
    for file in set(index_in["weight_map"].values()):
        assert set(safetensors_torch.load_file(str(out / file))) == \
            {k for k, v in index_in["weight_map"].items() if v == file}
    assert index_out["metadata"]["total_size"] == written.bytes_after == sum(
        t.numel() * t.element_size() for t in got.values())
    assert written.bytes_after < written.bytes_before
    assert written.config == {"hidden_size": 24, "intermediate_size": 24, "num_attention_heads": 2,
                              "num_key_value_heads": 1}
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in written.config} == written.config and config["vocab_size"] == 64
    assert (out / "generation_config.json").is_file()
    loaded = tf.LlamaForCausalLM.from_pretrained(out).eval()
    assert loaded.config.intermediate_size == module.config.intermediate_size == 24
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, original = loaded(input_ids=ids).logits, module(input_ids=ids).logits, real(input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, original)  # the slim model is not the original


def test_widths_the_config_cannot_express_are_refused_before_writing(llama, tmp_path):
    real, real_dg, meta, meta_dg, src = llama
    uneven = gp.Plan({_group(meta_dg, 48, "model.layers.0.mlp.up_proj.weight"): list(range(8)),
                      _group(meta_dg, 48, "model.layers.1.mlp.up_proj.weight"): list(range(16))})
    out = tmp_path / "slim"
    with pytest.raises(gp.RewriteError, match="config=False"):
        gp.apply_checkpoint(meta, meta_dg, uneven, src, out)
    assert not out.exists()
    written = gp.apply_checkpoint(meta, meta_dg, uneven, src, out, config=False)
    assert "GraphModule" in written.note and not (out / "config.json").exists()
    graph_state = gp.apply(real, real_dg, uneven).state_dict()  # the weights of the slim GraphModule
    got = _read(out)
    assert got["model.layers.1.mlp.down_proj.weight"].shape == (32, 32)
    for name, t in got.items():
        assert torch.equal(t, graph_state[name]), name


def _rewrite_shard(directory, name, change):
    """Rewrite the shard holding ``name`` with ``change(state)`` applied (and the index after it)."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    file = directory / index["weight_map"][name]
    state = safetensors_torch.load_file(str(file))
    change(state)
    safetensors_torch.save_file(state, str(file), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k != name or name in state}
    index_path.write_text(json.dumps(index))


def test_a_missing_or_misshapen_tensor_is_named(llama, tmp_path):
    _, _, meta, meta_dg, src = llama
    name = "model.layers.1.mlp.up_proj.weight"
    missing = Path(shutil.copytree(src, tmp_path / "missing"))
    _rewrite_shard(missing, name, lambda state: state.pop(name))
    with pytest.raises(gp.InputError, match=f"no tensor '{name}'"):
        gp.score_checkpoint("magnitude", missing, meta_dg)
    with pytest.raises(gp.InputError, match=f"no tensor '{name}'"):
        gp.apply_checkpoint(meta, meta_dg, _uniform_plan(meta_dg), missing, tmp_path / "out")
    shape = Path(shutil.copytree(src, tmp_path / "shape"))
    _rewrite_shard(shape, name, lambda state: state.update({name: torch.zeros(40, 32)}))
    with pytest.raises(gp.InputError, match=rf"'{name}' .* has shape \(40, 32\), the model's .* \(48, 32\)"):
        gp.score_checkpoint("l1", shape, meta_dg)
    tied = "model.embed_tokens.weight"  # held under no name at all: the tied name is said
    untied = Path(shutil.copytree(src, tmp_path / "untied"))
    _rewrite_shard(untied, tied, lambda state: state.pop(tied))
    with pytest.raises(gp.InputError, match=f"no tensor '{tied}' \\(nor under its tied name lm_head.weight\\)"):
        gp.apply_checkpoint(meta, meta_dg, _uniform_plan(meta_dg), untied, tmp_path / "out2")


def test_other_inputs_are_refused_with_what_to_do(llama, tmp_path):
    _, _, meta, meta_dg, src = llama
    with pytest.raises(gp.InputError, match="magnitude with p=1"):
        gp.score_checkpoint("l1", src, meta_dg, p=2)
    with pytest.raises(gp.InputError, match="need the model in memory"):
        gp.score_checkpoint("taylor", src, meta_dg)
    with pytest.raises(gp.InputError, match="neither model.safetensors nor"):
        gp.score_checkpoint("magnitude", tmp_path, meta_dg)
    with pytest.raises(gp.InputError, match="is the checkpoint directory"):
        gp.apply_checkpoint(meta, meta_dg, {}, src, src)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "model-00001-of-00009.safetensors").write_bytes(b"")
    with pytest.raises(gp.InputError, match="is not empty"):
        gp.apply_checkpoint(meta, meta_dg, {}, src, tmp_path / "used")
    extra = Path(shutil.copytree(src, tmp_path / "extra"))
    _rewrite_shard(extra, "model.norm.weight", lambda state: state.update({"model.extra": torch.zeros(2)}))
    index = json.loads((extra / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra"] = index["weight_map"]["model.norm.weight"]
    (extra / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(gp.InputError, match="'model.extra' .* is not a parameter or buffer"):
        gp.score_checkpoint("magnitude", extra, meta_dg)


def test_a_single_file_checkpoint_streams_too(llama, tmp_path):
    real, real_dg, meta, meta_dg, _ = llama
    src = tmp_path / "single"
    real.save_pretrained(src)
    assert (src / "model.safetensors").is_file() and not (src / "model.safetensors.index.json").exists()
    plan = _uniform_plan(meta_dg)
    scores = gp.score_checkpoint("magnitude", src, meta_dg)
    assert all(np.array_equal(v, gp.score("magnitude", real, real_dg)[k]) for k, v in scores.items())
    gp.apply_checkpoint(meta, meta_dg, plan, src, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    want = gp.apply(real, real_dg, plan, output="module").state_dict()
    assert all(torch.equal(t, want[k]) for k, t in _read(tmp_path / "out").items())
