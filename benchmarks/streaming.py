"""Streaming: prune a sharded ~1B-parameter checkpoint by 50% without the model in memory.

A LLaMA-shaped model (default: TinyLlama-1.1B's shape, 22 layers, hidden 2048, MLP 5632,
32 heads / 4 key-value heads, vocabulary 32000; bfloat16) is written as safetensors shards
from random weights, tensor by tensor (never the whole model), with its index and
config.json. Then, in a fresh subprocess:

1. the model is built on the meta device and its graph grouped (``factor="heads"``);
2. ``gp.score_checkpoint("magnitude", ...)`` reads the shards one tensor at a time;
3. ``gp.select(..., 0.5)`` (local scope: half of every group, so widths are the same in
   every layer and the config can express them);
4. ``gp.apply_checkpoint`` writes the slim shards, index and config.json.

The subprocess reports the time of each phase and its peak resident set size (the
kernel's high-water mark ``VmHWM``, reset at the start of each phase through
``/proc/self/clear_refs``; not ``ru_maxrss``, which a child inherits from its parent);
glibc is told to return freed large blocks to the OS at once (``MALLOC_MMAP_THRESHOLD_``,
as in memory.py), so RSS follows live memory. The target: the peak under 1.5x the largest
input shard plus the slim model's size. A last subprocess loads the slim checkpoint with ``from_pretrained`` and
runs it on 8 tokens. Every generated file is deleted at the end.

    python benchmarks/streaming.py                         # ~1.1B parameters, 512 MB shards
    python benchmarks/streaming.py --layers 4 --shard-mb 128   # quicker

Writes ``benchmarks/results/streaming.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
MB = 2**20


def llama_config(layers: int):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                            tie_word_embeddings=False, use_cache=False)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    return config


def write_random_checkpoint(config, directory: Path, shard_mb: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Shards of random weights in save_pretrained's layout, one tensor generated at a time
    (at most one shard in memory); the model is only ever built on meta."""
    import transformers as tf
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_mb * MB:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    with tqdm(total=len(shapes), desc="writing random shards", unit="tensor") as bar:
        for file, names in zip(files, shards):
            state = {}
            for name in names:
                state[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(dtype)
                weight_map[name] = file
                total += state[name].numel() * itemsize
                bar.update(1)
            save_file(state, str(directory / file), metadata={"format": "pt"})
            del state
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(directory)
    return {"params": sum(math.prod(s) for s in shapes.values()), "bytes": total, "shards": n}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PhasePeaks:
    """The peak RSS of each phase, exactly: Linux keeps the high-water mark (``VmHWM``) and
    resets it to the current RSS when 5 is written to ``/proc/self/clear_refs``."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.peaks: dict[str, float] = {}

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def enter(self, phase: str | None) -> None:
        if self.phase is not None:
            self.peaks[self.phase] = self._status("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.phase = phase

    def stop(self) -> dict[str, float]:
        self.enter(None)
        return self.peaks


def prune_phase(src: Path, out: Path, layers: int, ratio: float) -> dict:
    """Runs in its own process: build on meta, stream scores, select, stream the slim checkpoint."""
    import warnings

    import transformers as tf

    import graphprune as gp

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    peaks = PhasePeaks()
    row = {"rss_after_imports_mb": _rss_mb(), "peak_imports_mb": peaks._status("VmHWM")}
    peaks.enter("build")
    t = time.perf_counter()
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(llama_config(layers)).eval()
    dg = gp.DependencyGraph.build(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}, factor="heads")
    row["build_s"], row["rss_after_build_mb"] = time.perf_counter() - t, _rss_mb()
    peaks.enter("score")
    t = time.perf_counter()
    scores = gp.score_checkpoint("magnitude", src, dg, progress=True)
    row["score_s"] = time.perf_counter() - t
    t = time.perf_counter()
    plan = gp.select(dg, scores, ratio)
    row["select_s"] = time.perf_counter() - t
    row["rss_before_apply_mb"] = _rss_mb()
    peaks.enter("apply")
    t = time.perf_counter()
    written = gp.apply_checkpoint(model, dg, plan, src, out, progress=True)
    row["apply_s"] = time.perf_counter() - t
    row["phase_peaks_mb"] = peaks.stop()
    row["peak_mb"] = max(row["peak_imports_mb"], *row["phase_peaks_mb"].values())
    row["slim_config"] = written.config
    row["removed_channels"] = sum(len(v) for v in plan.values())
    return row


def check_phase(out: Path) -> dict:
    """Runs in its own process: the slim checkpoint loads with from_pretrained and runs."""
    import transformers as tf

    t = time.perf_counter()
    model = tf.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(8).reshape(1, 8)).logits
    return {"load_and_run_s": time.perf_counter() - t, "logits_shape": list(logits.shape),
            "finite": bool(torch.isfinite(logits).all()),
            "params": sum(p.numel() for p in model.parameters())}


def _subprocess(args: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dir_bytes(directory: Path) -> tuple[int, int]:
    sizes = [p.stat().st_size for p in directory.glob("*.safetensors")]
    return sum(sizes), max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--shard-mb", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--workdir", default=None, help="where the shards go (deleted afterwards)")
    parser.add_argument("--no-check", action="store_true", help="skip loading the slim checkpoint")
    parser.add_argument("--phase", choices=["prune", "check"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "prune":
        print(json.dumps(prune_phase(Path(args.src), Path(args.out), args.layers, args.ratio)))
        return
    if args.phase == "check":
        print(json.dumps(check_phase(Path(args.out))))
        return

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="gp_streaming_", dir=args.workdir))
    src, out = work / "model", work / "slim"
    src.mkdir()
    try:
        t = time.perf_counter()
        made = write_random_checkpoint(llama_config(args.layers), src, args.shard_mb)
        write_s = time.perf_counter() - t
        model_bytes, largest = _dir_bytes(src)
        row = _subprocess(["--phase", "prune", "--src", str(src), "--out", str(out), "--layers", str(args.layers),
                           "--ratio", str(args.ratio)])
        slim_bytes, slim_largest = _dir_bytes(out)
        check = {} if args.no_check else _subprocess(["--phase", "check", "--out", str(out)])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    target_mb = 1.5 * largest / MB + slim_bytes / MB
    result = {
        "model": f"LLaMA-shaped, {args.layers} layers, hidden 2048, MLP 5632, 32/4 heads, vocab 32000, bfloat16",
        "params": made["params"], "model_mb": model_bytes / MB, "shards": made["shards"],
        "largest_shard_mb": largest / MB, "slim_mb": slim_bytes / MB, "largest_slim_shard_mb": slim_largest / MB,
        "write_random_shards_s": write_s, **row,
        "streaming_peak_mb": max(row["phase_peaks_mb"]["score"], row["phase_peaks_mb"]["apply"]),
        "process_peak_mb": row["peak_mb"], "target_mb": target_mb,
        "check": check, "ratio": args.ratio, "torch_threads": 1,
        "command": "python benchmarks/streaming.py" + (f" --layers {args.layers}" if args.layers != 22 else "")
                   + (f" --shard-mb {args.shard_mb}" if args.shard_mb != 512 else ""),
    }
    result["under_target"] = result["streaming_peak_mb"] < target_mb
    result["process_under_target"] = result["process_peak_mb"] < target_mb
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("parameters", f"{made['params'] / 1e9:.2f} B"),
        ("model on disk", f"{model_bytes / MB:,.0f} MB in {made['shards']} shards (largest {largest / MB:,.0f} MB)"),
        ("slim model", f"{slim_bytes / MB:,.0f} MB (largest shard {slim_largest / MB:,.0f} MB)"),
        ("build on meta", f"{row['build_s']:.1f} s, peak RSS {row['phase_peaks_mb']['build']:,.0f} MB "
                          f"({row['rss_after_build_mb']:,.0f} MB after it)"),
        ("streamed scores", f"{row['score_s']:.1f} s, peak RSS {row['phase_peaks_mb']['score']:,.0f} MB"),
        ("streamed apply", f"{row['apply_s']:.1f} s, peak RSS {row['phase_peaks_mb']['apply']:,.0f} MB"),
        ("target", f"< 1.5 x largest shard + slim = {target_mb:,.0f} MB: streaming phases "
                   f"{'met' if result['under_target'] else 'NOT met'}; whole process ("
                   f"{row['peak_mb']:,.0f} MB, the build included) {'met' if result['process_under_target'] else 'NOT met'}"),
        ("slim config", ", ".join(f"{k}={v}" for k, v in row["slim_config"].items())),
    ]
    if check:
        rows.append(("from_pretrained + run", f"{check['load_and_run_s']:.1f} s, {check['params'] / 1e9:.2f} B "
                                              f"params, logits {check['logits_shape']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
