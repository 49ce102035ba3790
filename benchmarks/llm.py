"""LLM benchmark: perplexity of a tiny decoder-only language model after structural pruning.

A Hugging Face ``LlamaForCausalLM`` built from a config (byte-level vocabulary of 256,
hidden 128, 4 layers, 4 query heads over 2 key/value heads, MLP 344) is trained from scratch
on a corpus every machine has: the source files of the Python standard library
(``sysconfig.get_paths()["stdlib"]``, ``*.py`` outside test suites, sorted by path; every
tenth file held out for evaluation, the rest for training and calibration). Then, for
``ratio`` 0.25 and 0.5 (``gp.prune(ratio=...)``: that fraction of every prunable group's
channels, hidden size included) and each criterion:

- ``magnitude`` (L2 norm of the weights a channel owns),
- ``taylor`` (first-order Taylor, Molchanov et al. 2019) on calibration batches of the
  training split with the next-byte cross-entropy,
- ``activation`` (Wanda, Sun et al. 2023: ``|W| * ||X||`` summed over the channel's weights)
  on the same calibration batches, given as dicts ``{"input_ids": ...}``,

it reports the held-out perplexity right after pruning and after a short fine-tune (AdamW on
the training split), the fraction of parameters left, and ``gp.verify`` of the plan
restricted to the exact groups (max abs difference between the slim model and the masked
original; the hidden-size group is inexact by design, RMSNorm averages over it).

Torch-Pruning 1.6.1 (``MetaPruner``, its ``examples/LLMs/prune_llm.py`` recipe: heads of
q/k/v, hidden size, ``lm_head`` ignored) runs on the same trained weights in a subprocess
of ``/tmp/benchvenv/bin/python`` (``--tp-python``) with a timeout (``--tp-timeout``); a run
past it is recorded as TIMEOUT, a crash as FAILED with its error.

Every batch has the same shape (``batch`` x ``seq``): the graph ``torch.export`` captures
for a Hugging Face model, and the slim model made from it, run at the example input shape.

    PYTHONPATH=. python benchmarks/llm.py              # both models (~14 min on a loaded 2-core machine)
    PYTHONPATH=. python benchmarks/llm.py --quick      # tiny models, a smoke run of ~3 min (llm_quick.json)
    PYTHONPATH=. python benchmarks/llm.py --steps 600 --out /tmp/llm.json
    python benchmarks/llm.py --markdown                # results/llm.json as the docs' table
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
HERE = Path(__file__).resolve().parent
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}

FULL = dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=344, seq=128, batch=8, steps=300,
            ft_steps=40, lr=3e-3, ft_lr=1e-3, eval_batches=8, calib_batches=4, corpus_mb=4.0, tp_timeout=120.0)
QUICK = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=48, seq=32, batch=4, steps=8,
             ft_steps=2, lr=3e-3, ft_lr=1e-3, eval_batches=2, calib_batches=1, corpus_mb=0.3, tp_timeout=60.0)
RATIOS = (0.25, 0.5)
METHODS = ("magnitude", "taylor", "activation")


# ----------------------------------------------------------------------------- corpus
def corpus(max_bytes: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Bytes of the standard library's ``*.py`` files: (train, held-out, description).

    Files are taken in sorted path order until ``max_bytes`` are read; every tenth file
    (by that order) is held out. Files are joined with a blank line."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py")
                    if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])),
                   key=lambda p: p.relative_to(root).as_posix())
    train, held, total, used = [], [], 0, 0
    for i, path in enumerate(files):
        if total >= max_bytes:
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (held if i % 10 == 0 else train).append(data + b"\n\n")
        total += len(data)
        used += 1
    to_array = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8).astype(np.int64)  # noqa: E731
    info = {"root": str(root), "python": platform.python_version(), "files": used,
            "train_bytes": sum(map(len, train)), "heldout_bytes": sum(map(len, held)),
            "first": files[0].relative_to(root).as_posix() if files else None}
    return to_array(train), to_array(held), info


def windows(tokens: np.ndarray, n: int, batch: int, seq: int, rng: np.random.Generator | None):
    """``n`` batches of (inputs, next-byte targets), random windows (``rng``) or evenly spaced ones."""
    import torch

    count = n * batch
    if rng is not None:
        starts = rng.integers(0, len(tokens) - seq - 1, size=count)
    else:
        starts = np.linspace(0, len(tokens) - seq - 1, count).astype(np.int64)
    x = np.stack([tokens[s:s + seq] for s in starts])
    y = np.stack([tokens[s + 1:s + seq + 1] for s in starts])
    xs, ys = torch.from_numpy(x).split(batch), torch.from_numpy(y).split(batch)
    return list(zip(xs, ys))


# ----------------------------------------------------------------------------- model
def build(cfg: dict, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                         num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
                         intermediate_size=cfg["intermediate"], max_position_embeddings=cfg["seq"],
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def user_decoder(cfg: dict, seed: int = 0):
    """A decoder-only LM written as a user would, in plain torch: learned positions, RMSNorm,
    grouped-query attention through ``F.scaled_dot_product_attention``, SwiGLU MLP."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, d: int, heads: int, kv_heads: int) -> None:
            super().__init__()
            self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
            self.q_proj = nn.Linear(d, heads * self.head_dim, bias=False)
            self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
            self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)

        def forward(self, x):
            b, n, _ = x.shape
            q = self.q_proj(x).view(b, n, self.heads, -1).transpose(1, 2)
            k = self.k_proj(x).view(b, n, self.kv_heads, -1).transpose(1, 2)
            v = self.v_proj(x).view(b, n, self.kv_heads, -1).transpose(1, 2)
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))

    class Layer(nn.Module):
        def __init__(self, d: int, heads: int, kv_heads: int, inter: int) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
            self.attn = Attention(d, heads, kv_heads)
            self.gate_proj = nn.Linear(d, inter, bias=False)
            self.up_proj = nn.Linear(d, inter, bias=False)
            self.down_proj = nn.Linear(inter, d, bias=False)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            h = self.norm2(x)
            return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = cfg["hidden"]
            self.embed = nn.Embedding(256, d)
            self.pos = nn.Parameter(torch.randn(cfg["seq"], d) * 0.02)
            self.layers = nn.ModuleList(Layer(d, cfg["heads"], cfg["kv_heads"], cfg["intermediate"])
                                        for _ in range(cfg["layers"]))
            self.norm = nn.RMSNorm(d, eps=1e-6)
            self.lm_head = nn.Linear(d, 256, bias=False)

        def forward(self, input_ids):
            x = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
            for layer in self.layers:
                x = layer(x)
            return self.lm_head(self.norm(x))

    torch.manual_seed(seed)
    model = Decoder()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0, 0.02)
    return model


def make(kind: str, cfg: dict):
    return build(cfg) if kind == "llama" else user_decoder(cfg)


def logits_of(out: Any):
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "logits", out)


def loss_fn(out: Any, y):
    import torch.nn.functional as F

    logits = logits_of(out)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def call(model, x):
    import torch

    if isinstance(model, torch.fx.GraphModule) or "use_cache" not in inspect.signature(model.forward).parameters:
        return model(input_ids=x)
    return model(input_ids=x, use_cache=False)


def perplexity(model, batches) -> float:
    import torch

    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            total += loss_fn(call(model, x), y).item() * y.numel()
            n += y.numel()
    model.train(was)
    return math.exp(total / n)


def train(model, batches, lr: float, warmup: int, desc: str) -> list[float]:
    """AdamW, linear warmup then cosine decay, gradient clipping at 1; returns the losses."""
    import torch
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    model.train()
    losses = []
    for x, y in tqdm(batches, desc=desc, leave=False, mininterval=5):
        loss = loss_fn(call(model, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ----------------------------------------------------------------------------- graphprune
def prune_row(model, example, method: str, ratio: float, calib, ft_batches, heldout, cfg) -> dict:
    import graphprune as gp

    options: dict[str, Any] = {}
    if method == "taylor":
        options = dict(data=calib, loss_fn=loss_fn)
    elif method == "activation":
        options = dict(data=[{"input_ids": x} for x, _ in calib])
    row: dict[str, Any] = {"tool": "graphprune", "method": method, "ratio": ratio}
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = gp.prune(model, {"input_ids": example}, method=method, ratio=ratio, **options)
        row["prune_s"] = time.perf_counter() - start
    except Exception as exc:
        return {**row, "status": "FAILED", "error": f"{type(exc).__name__}: {exc}"[:500]}
    slim, dg, plan = result.model, result.graph, result.plan
    row.update(status="ok", params_before=result.before.params, params_after=result.after.params,
               left=result.after.params / result.before.params,
               inexact_groups_cut=sorted(int(g) for g, ch in plan.items() if len(ch) and not dg.groups[g].exact))
    exact = gp.Plan({gid: ch for gid, ch in plan.items() if dg.groups[gid].exact})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row["verify_exact_groups"] = float(gp.verify(model, {"input_ids": example}, exact, dg=dg))
    row["ppl_pruned"] = perplexity(slim, heldout)
    start = time.perf_counter()
    train(slim, ft_batches, cfg["ft_lr"], max(1, len(ft_batches) // 10), f"fine-tune {method} {ratio}")
    row["finetune_s"] = time.perf_counter() - start
    row["ppl_finetuned"] = perplexity(slim, heldout)
    return row


# ----------------------------------------------------------------------------- Torch-Pruning (subprocess)
def tp_child(workdir: Path) -> None:
    """Runs in /tmp/benchvenv: Torch-Pruning on the trained model; appends rows to rows.jsonl."""
    sys.path.insert(0, str(HERE))
    import _torchvision_ops  # transformers imports torchvision, whose C++ ops may not load here

    _torchvision_ops.import_torchvision()
    from importlib.metadata import version as dist_version

    import torch
    import torch_pruning as tp

    version = dist_version("torch-pruning")
    job = json.loads((workdir / "job.json").read_text())
    cfg, kind = job["cfg"], job["kind"]
    data = torch.load(workdir / "data.pt", weights_only=True)
    calib, ft_batches, heldout = data["calib"], data["ft"], data["heldout"]
    state = torch.load(workdir / "model.pt", weights_only=True)
    torch.set_num_threads(1)
    out = workdir / "rows.jsonl"
    for ratio in RATIOS:
        for method in ("magnitude", "taylor"):
            model = make(kind, cfg)
            model.load_state_dict(state)
            model.eval()
            row = {"tool": "torch_pruning", "version": version, "method": method, "ratio": ratio}
            heads = {}
            for m in model.modules():
                if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
                    heads[m.q_proj] = cfg["heads"]
                    heads[m.k_proj] = heads[m.v_proj] = cfg["kv_heads"]
            example = {"input_ids": calib[0][0], "use_cache": False} if kind == "llama" else calib[0][0]
            imp = tp.importance.MagnitudeImportance(p=2) if method == "magnitude" else tp.importance.TaylorImportance()
            stage = "MetaPruner"
            with open(out, "a") as f:  # the parent reads what was started, should this hang
                f.write(json.dumps({**row, "status": "STARTED", "stage": stage}) + "\n")
            try:
                n0 = sum(p.numel() for p in model.parameters())
                start = time.perf_counter()
                pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio,
                                              ignored_layers=[model.lm_head], num_heads=heads,
                                              prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
                if method == "taylor":
                    stage = "gradients"
                    for x, y in calib:
                        loss_fn(call(model, x), y).backward()
                stage = "step"
                pruner.step()
                model.zero_grad(set_to_none=True)
                for m in model.modules():  # the recipe's attribute reset after step()
                    if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
                        n_q, n_kv = m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim
                        if kind == "llama":
                            m.num_key_value_groups = max(n_q // max(n_kv, 1), 1)
                            model.config.num_attention_heads, model.config.num_key_value_heads = n_q, n_kv
                        else:
                            m.heads, m.kv_heads = n_q, n_kv
                if kind == "llama":
                    model.config.hidden_size = model.lm_head.in_features
                for m in model.modules():  # Torch-Pruning slices nn.RMSNorm's weight, not its normalized_shape
                    if isinstance(m, torch.nn.RMSNorm) and m.weight is not None:
                        m.normalized_shape = tuple(m.weight.shape)
                row["prune_s"] = time.perf_counter() - start
                n1 = sum(p.numel() for p in model.parameters())
                row.update(status="ok", params_before=n0, params_after=n1, left=n1 / n0)
                stage = "evaluate"
                row["ppl_pruned"] = perplexity(model, heldout)
                stage = "fine-tune"
                train(model, ft_batches, cfg["ft_lr"], max(1, len(ft_batches) // 10), "tp fine-tune")
                row["ppl_finetuned"] = perplexity(model, heldout)
            except Exception as exc:
                row.update(status="FAILED", error=f"{stage}: {type(exc).__name__}: {exc}"[:500],
                           traceback=traceback.format_exc()[-1000:])
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")


def torch_pruning_rows(kind: str, model, cfg, calib, ft_batches, heldout, python: str, timeout: float) -> list[dict]:
    import torch

    if not Path(python).exists():
        return [{"tool": "torch_pruning", "status": "FAILED", "error": f"{python} not found"}]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.save(model.state_dict(), work / "model.pt")
        torch.save({"calib": calib, "ft": ft_batches, "heldout": heldout}, work / "data.pt")
        (work / "job.json").write_text(json.dumps({"cfg": cfg, "kind": kind}))
        env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
        status, error = "ok", None
        try:
            proc = subprocess.run([python, str(Path(__file__).resolve()), "--tp-child", str(work)], env=env,
                                  timeout=timeout, capture_output=True, text=True)
            if proc.returncode:
                status, error = "FAILED", proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                error = error[0][:500]
        except subprocess.TimeoutExpired:
            status = "TIMEOUT"
        lines = (work / "rows.jsonl").read_text().splitlines() if (work / "rows.jsonl").exists() else []
    rows: dict[tuple, dict] = {}
    for line in lines:
        r = json.loads(line)
        rows[(r["method"], r["ratio"])] = r
    out = []
    for ratio in RATIOS:
        for method in ("magnitude", "taylor"):
            r = rows.get((method, ratio))
            if r is None and not out and status != "ok":  # nothing started: the import or the load hung/failed
                r = {"tool": "torch_pruning", "method": method, "ratio": ratio, "status": status,
                     "error": error or f"still importing or loading after {timeout:.0f} s"}
            elif r is None:
                r = {"tool": "torch_pruning", "method": method, "ratio": ratio, "status": "NOT RUN",
                     "error": f"the subprocess ended ({status}) before this row"}
            elif r["status"] == "STARTED":
                if status == "TIMEOUT":
                    r = {**r, "status": "TIMEOUT", "error": f"{r['stage']}: still running after {timeout:.0f} s "
                                                            "(the whole Torch-Pruning subprocess)"}
                else:
                    r = {**r, "status": "FAILED", "error": error or "the subprocess ended"}
            out.append(r)
    return out


# ----------------------------------------------------------------------------- report
MODELS = {"llama": "HF LlamaForCausalLM (GQA, rotary)", "user": "plain-torch decoder (user-written GQA attention)"}


def table(result: dict) -> str:
    lines = ["| model | tool | criterion | ratio | params left | ppl pruned | ppl fine-tuned | exact groups: max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, res in result["models"].items():
        t = res["trained"]
        lines.append(f"| {kind} | trained, unpruned ({t['params']:,} params) | none | 0.00 | 1.000 | "
                     f"{t['ppl']:.2f} | - | - |")
        for r in res["rows"]:
            name = "graphprune" if r["tool"] == "graphprune" else "Torch-Pruning"
            if r.get("status") != "ok":
                err = r.get("error", "").replace("|", "/")
                lines.append(f"| {kind} | {name} | {r['method']} | {r['ratio']:.2f} | {r['status']} | | | {err[:100]} |")
                continue
            v = r.get("verify_exact_groups")
            lines.append(f"| {kind} | {name} | {r['method']} | {r['ratio']:.2f} | {r['left']:.3f} | "
                         f"{r['ppl_pruned']:.2f} | {r['ppl_finetuned']:.2f} | "
                         f"{format(v, '.1e') if v is not None else 'not checked'} |")
    return "\n".join(lines)


def run_model(kind: str, cfg: dict, train_batches, calib, ft_batches, heldout, args) -> dict:
    model = make(kind, cfg)
    n0 = sum(p.numel() for p in model.parameters())
    ppl0 = perplexity(model, heldout)
    start = time.perf_counter()
    losses = train(model, train_batches, cfg["lr"], max(1, cfg["steps"] // 10), f"train {kind}")
    trained = {"params": n0, "ppl_init": ppl0, "ppl": perplexity(model, heldout),
               "train_s": time.perf_counter() - start, "loss_first": losses[0],
               "loss_last": float(np.mean(losses[-10:]))}
    print(f"{kind}: trained {n0:,} parameters in {trained['train_s']:.0f} s: held-out perplexity {ppl0:.1f} -> "
          f"{trained['ppl']:.2f}", flush=True)
    example = heldout[0][0]
    rows = []
    for ratio in RATIOS:
        for method in METHODS:
            row = prune_row(model, example, method, ratio, calib, ft_batches, heldout, cfg)
            rows.append(row)
            print(kind, json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    if args.tp_python:
        tp = torch_pruning_rows(kind, model, cfg, calib, ft_batches, heldout, args.tp_python, cfg["tp_timeout"])
        rows.extend(tp)
        for row in tp:
            print(kind, json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    return {"description": MODELS[kind], "trained": trained, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and corpus: a smoke run (~3 min)")
    parser.add_argument("--models", default="llama,user", help="comma-separated: llama, user (default both)")
    parser.add_argument("--steps", type=int, help="training steps (default 300; --quick 8)")
    parser.add_argument("--ft-steps", type=int, help="fine-tune steps after pruning (default 40; --quick 2)")
    parser.add_argument("--out", help="JSON path (default results/llm.json; --quick results/llm_quick.json)")
    parser.add_argument("--tp-python", default="/tmp/benchvenv/bin/python",
                        help="Python with torch_pruning installed ('' to skip Torch-Pruning)")
    parser.add_argument("--tp-timeout", type=float, help="seconds for each Torch-Pruning subprocess (default 120)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true", help="print the JSON (--out) as the docs' table")
    parser.add_argument("--tp-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tp_child:
        tp_child(Path(args.tp_child))
        return
    out = Path(args.out) if args.out else RESULTS / ("llm_quick.json" if args.quick else "llm.json")
    if args.markdown:
        print(table(json.loads(out.read_text())))
        return
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    if not kinds or any(k not in MODELS for k in kinds):
        parser.error(f"--models takes {', '.join(MODELS)}")

    import torch

    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    for key, value in (("steps", args.steps), ("ft_steps", args.ft_steps), ("tp_timeout", args.tp_timeout)):
        if value is not None:
            cfg[key] = value
    started = time.perf_counter()
    train_tok, held_tok, info = corpus(int(cfg["corpus_mb"] * 2**20))
    print(f"corpus: {info['files']} files of the stdlib ({info['python']}), {info['train_bytes']:,} bytes for "
          f"training, {info['heldout_bytes']:,} held out", flush=True)
    rng = np.random.default_rng(0)
    b, s = cfg["batch"], cfg["seq"]
    train_batches = windows(train_tok, cfg["steps"], b, s, rng)
    calib = windows(train_tok, cfg["calib_batches"], b, s, rng)
    ft_batches = windows(train_tok, cfg["ft_steps"], b, s, rng)
    heldout = windows(held_tok, cfg["eval_batches"], b, s, None)
    models = {kind: run_model(kind, cfg, train_batches, calib, ft_batches, heldout, args) for kind in kinds}

    import transformers

    import graphprune as gp

    command = "PYTHONPATH=. python benchmarks/llm.py" + (" --quick" if args.quick else "") + \
        (f" --steps {args.steps}" if args.steps else "") + (f" --models {args.models}" if args.models != "llama,user" else "")
    result = {"cfg": cfg, "corpus": info, "threads": args.threads, "models": models,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "graphprune": getattr(gp, "__version__", "?"), "python": platform.python_version()},
              "total_s": time.perf_counter() - started, "command": command}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(table(result))
    print(f"\n{time.perf_counter() - started:.0f} s in all; wrote {out}")


if __name__ == "__main__":
    main()
