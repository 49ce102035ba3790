"""The random networks of the fuzz tests: an ``Arch`` (what to compute) and ``FuzzNet`` (the module).

An ``Arch`` is a small DAG of operations over 4-D feature maps ``[B, C, H, W]`` and 2-D
features ``[B, F]``, on one input or two, plus model-level traits: how the outputs are
packed (a tensor or tuple, a dict, a list, nested containers), an in-place op on the
input, training mode, a shape-dependent Python branch that forces the ``torch.export``
fallback, and an attribute the forward stores on the module. ``FuzzNet(arch)`` builds it
as an ``nn.Module`` whose forward is plain torch code; ``arch.source()`` prints that
code, to paste as a repro. ``strategies.architectures`` draws the ops of this file,
``hazards`` registers more (``EXTRA``) and draws the traits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MAX_C = 12  # widest channel count the strategies draw (grouped convs and cats go up to twice that)
MAX_HW = 16  # largest feature map side

@dataclass(frozen=True)
class Op:
    kind: str
    inputs: tuple[int, ...]
    args: tuple = ()


@dataclass
class Arch:
    """A random network: input ``[B, c_in, hw, hw]``, ``ops`` in order, ``outputs`` indices.

    Value 0 is the input; with ``c_in2`` > 0 value 1 is a second input ``[B, c_in2, hw, hw]``.
    Every op appends its outputs (one, or several for splits). ``shapes[i]`` is
    ``(C, H, W)`` or ``(F,)`` of value ``i`` (batch dimension left out).

    Traits (``hazards.traits`` draws them): ``form`` packs the outputs (``plain``: a
    tensor or a tuple; ``dict``, ``list``, ``nested``); ``inplace_input`` changes the
    first input in place before anything else (``mul_`` or ``iadd``); ``training`` leaves
    the model in training mode; ``export`` wraps the body in ``if x.shape[0] > 0:``, which
    torch.fx cannot trace; ``stash`` stores the first output on the module; ``sink`` adds
    ``v.square().sum()`` of every dead-end value ``v`` (one that no op reads and that is no
    output) to the first output, so that what happens there shows in the outputs without
    pinning its channels (a sum over channels is exact).
    """

    c_in: int
    hw: int
    ops: list[Op] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    outputs: tuple[int, ...] = ()
    c_in2: int = 0
    batch: int = 1
    form: str = "plain"
    inplace_input: str = ""
    training: bool = False
    export: bool = False
    stash: bool = False
    sink: bool = False

    @property
    def n_inputs(self) -> int:
        return 2 if self.c_in2 else 1

    def traits(self) -> list[str]:
        """The model-level traits that differ from a plain eval-mode network."""
        out = [f"outputs as {self.form}"] if self.form != "plain" else []
        out += [f"input changed in place ({self.inplace_input})"] if self.inplace_input else []
        out += ["training mode"] * self.training + ["export fallback forced"] * self.export
        out += ["forward stores an attribute"] * self.stash
        return out + ["dead ends summed into the first output"] * (self.sink and bool(self.dead_ends()))

    def dead_ends(self) -> list[int]:
        """Values that ops compute but nothing reads and no output returns."""
        used = {j for op in self.ops for j in op.inputs} | set(self.outputs)
        return [j for j in range(self.n_inputs, len(self.shapes)) if j not in used]

    def source(self) -> str:
        """The forward pass as Python lines (``v0``, and ``v1`` for two inputs, are the inputs)."""
        ins = [f"v0: [{self.batch}, {self.c_in}, {self.hw}, {self.hw}]"]
        if self.c_in2:
            ins.append(f"v1: [{self.batch}, {self.c_in2}, {self.hw}, {self.hw}]")
        lines = [f"# input{'s' if self.c_in2 else ''}: {', '.join(ins)}"]
        lines += [f"# {t}" for t in self.traits()]
        k = self.n_inputs
        for i, op in enumerate(self.ops):
            n_out = n_outputs(op)
            outs = ", ".join(f"v{k + j}" for j in range(n_out))
            ins = ", ".join(f"v{j}" for j in op.inputs)
            if op.kind in ("again", "tied"):
                j = op.args[0]
                lines.append(f"{outs} = {op.kind}#{i}({ins}{', ' if op.args[1:] else ''}"
                             f"{', '.join(map(repr, op.args[1:]))})  # {'reuses' if op.kind == 'again' else 'ties'}"
                             f" op {j}'s {'module' if op.kind == 'again' else 'weight'} ({self.ops[j].kind}#{j})"
                             f" -> {self.shapes[k:k + n_out]}")
                k += n_out
                continue
            lines.append(f"{outs} = {op.kind}#{i}({ins}{', ' if op.args else ''}"
                         f"{', '.join(map(repr, op.args))})  # -> {self.shapes[k:k + n_out]}")
            k += n_out
        lines.append(f"return {', '.join(f'v{j}' for j in self.outputs)}")
        return "\n".join(lines)

    def __repr__(self) -> str:  # hypothesis prints this for a falsifying example
        return "Arch(\n" + self.source() + "\n)"


def n_outputs(op: Op) -> int:
    if op.kind == "split":
        return len(op.args[0])
    if op.kind == "chunk":
        return op.args[0]
    return 1


@dataclass(frozen=True)
class Extra:
    """An op kind registered from outside this file (``hazards``): how ``FuzzNet`` creates
    its modules and parameters, ``make(net, i, op, c, gen)``, and computes it,
    ``run(net, i, op, ins) -> tensor``."""

    make: Callable | None
    run: Callable


EXTRA: dict[str, Extra] = {}


def _affine(norm: nn.Module, gen: torch.Generator) -> nn.Module:
    """A LayerNorm/GroupNorm with random affine parameters (they start at ones and zeros)."""
    if getattr(norm, "weight", None) is not None:
        with torch.no_grad():
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen) * 0.1)
    return norm


def _pack(form: str, outs: list):
    """The outputs as the model returns them."""
    if form == "dict":
        return {f"out{k}": o for k, o in enumerate(outs)}
    if form == "list":
        return list(outs)
    if form == "nested":
        return outs[0], {"more": list(outs[1:]), "first": (outs[0],)}
    return outs[0] if len(outs) == 1 else tuple(outs)


class FuzzNet(nn.Module):
    """The module an ``Arch`` describes; eval mode, BatchNorm with random statistics."""

    def __init__(self, arch: Arch, seed: int = 0) -> None:
        super().__init__()
        self.arch = arch
        self.stash = None  # the first output, with the ``stash`` trait
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.ModuleDict()
            for i, op in enumerate(arch.ops):
                self._make(i, op, arch.shapes[op.inputs[0]][0], gen)
        self.eval()

    def _make(self, i: int, op: Op, c: int, gen: torch.Generator) -> None:
        L = self.layers
        if op.kind in EXTRA:
            if EXTRA[op.kind].make is not None:
                EXTRA[op.kind].make(self, i, op, c, gen)
        elif op.kind == "conv":
            c_out, k, stride, groups, bias = op.args
            L[f"conv{i}"] = nn.Conv2d(c, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=bias)
        elif op.kind == "fconv":
            c_out, k, groups, bias = op.args
            self.register_parameter(f"w{i}", nn.Parameter(torch.randn(c_out, c // groups, k, k, generator=gen) * 0.3))
            self.register_parameter(f"b{i}", nn.Parameter(torch.randn(c_out, generator=gen) * 0.1) if bias else None)
        elif op.kind == "bn":
            bn = nn.BatchNorm2d(c) if len(op.args) == 0 else nn.BatchNorm1d(c)
            with torch.no_grad():
                bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            L[f"bn{i}"] = bn
        elif op.kind == "act":
            name = op.args[0]
            module = {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "gelu": nn.GELU(),
                      "silu": nn.SiLU(), "hardswish": nn.Hardswish(), "leaky_relu": nn.LeakyReLU(0.1),
                      "relu6": nn.ReLU6()}.get(name)
            if module is not None:
                L[f"act{i}"] = module
        elif op.kind == "se":
            (r,) = op.args
            L[f"se{i}"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, r, 1), nn.ReLU(),
                                        nn.Conv2d(r, c, 1), nn.Sigmoid())
        elif op.kind == "pool":
            mode = op.args[0]
            L[f"pool{i}"] = {"max2": nn.MaxPool2d(2), "avg2": nn.AvgPool2d(2),
                             "max3s1": nn.MaxPool2d(3, 1, 1), "adapt1": nn.AdaptiveAvgPool2d(1),
                             "adapt2": nn.AdaptiveAvgPool2d(2)}[mode]
        elif op.kind == "up" and op.args[0] == "module":
            L[f"up{i}"] = nn.Upsample(scale_factor=2, mode="nearest")
        elif op.kind == "linear":
            n_out, bias = op.args
            L[f"linear{i}"] = nn.Linear(c, n_out, bias=bias)
        elif op.kind == "flatten" and op.args[0] == "module":
            L[f"flatten{i}"] = nn.Flatten()
        elif op.kind == "ln":
            L[f"ln{i}"] = _affine(nn.LayerNorm(c, elementwise_affine=op.args[1]), gen)
        elif op.kind == "gn":
            g, affine = op.args
            L[f"gn{i}"] = _affine(nn.GroupNorm(g, c, affine=affine), gen)
        elif op.kind == "convT":
            c_out, k, stride, pad, out_pad, groups, bias = op.args
            L[f"convT{i}"] = nn.ConvTranspose2d(c, c_out, k, stride, pad, out_pad, groups, bias)
        elif op.kind == "mha":
            attn = nn.MultiheadAttention(c, op.args[0], batch_first=True)
            with torch.no_grad():  # biases start at zero: random ones, so they count
                attn.in_proj_bias.copy_(torch.randn(3 * c, generator=gen) * 0.1)
                attn.out_proj.bias.copy_(torch.randn(c, generator=gen) * 0.1)
            L[f"mha{i}"] = attn
        elif op.kind == "sdpa":
            heads, d = op.args[:2]
            L[f"qkv{i}"] = nn.Linear(c, 3 * heads * d)
            L[f"proj{i}"] = nn.Linear(heads * d, c)

    def forward(self, x: torch.Tensor):
        return self._forward([x])

    def _forward(self, xs: list):
        arch = self.arch
        if arch.inplace_input == "mul_":
            xs[0].mul_(2.0)
        elif arch.inplace_input == "iadd":
            x = xs[0]
            x += 1.0
        if arch.export:
            if xs[0].shape[0] > 0:  # Python control flow on a shape: torch.fx fails, torch.export follows
                outs = self._run(xs)
            else:  # pragma: no cover - never taken
                outs = [xs[0]]
        else:
            outs = self._run(xs)
        if arch.stash:
            self.stash = outs[0]
        return _pack(arch.form, outs)

    def _run(self, vals: list) -> list:
        L = self.layers
        for i, op in enumerate(self.arch.ops):
            ins = [vals[j] for j in op.inputs]
            kind, a = op.kind, op.args
            if kind in EXTRA:
                out = EXTRA[kind].run(self, i, op, ins)
            elif kind == "conv":
                out = L[f"conv{i}"](ins[0])
            elif kind == "fconv":
                out = F.conv2d(ins[0], getattr(self, f"w{i}"), getattr(self, f"b{i}"), 1, a[1] // 2, 1, a[2])
            elif kind == "bn":
                out = L[f"bn{i}"](ins[0])
            elif kind == "act":
                name = a[0]
                if name == "F.relu":
                    out = F.relu(ins[0])
                elif name == "torch.relu":
                    out = torch.relu(ins[0])
                elif name == "method_relu":
                    out = ins[0].relu()
                elif name == "sigmoid":
                    out = torch.sigmoid(ins[0])
                elif name == "tanh":
                    out = ins[0].tanh()
                else:
                    out = L[f"act{i}"](ins[0])
            elif kind == "add":
                out = ins[0] + ins[1]
            elif kind == "iadd":
                out = ins[0] * 1.0
                out += ins[1]
            elif kind == "mul":
                out = ins[0] * ins[1]
            elif kind == "se":
                out = ins[0] * L[f"se{i}"](ins[0])
            elif kind == "scale":
                out = ins[0] * a[0] + a[1]
            elif kind == "cat":
                out = torch.cat(ins, dim=1)
            elif kind == "split":
                parts = torch.split(ins[0], list(a[0]), dim=1)
                vals.extend(parts[j] for j in range(len(a[0])))  # fx cannot iterate a Proxy
                continue
            elif kind == "chunk":
                parts = ins[0].chunk(a[0], 1)
                vals.extend(parts[j] for j in range(a[0]))
                continue
            elif kind == "pool":
                out = L[f"pool{i}"](ins[0])
            elif kind == "fpool":
                out = F.max_pool2d(ins[0], 2) if a[0] == "max" else F.avg_pool2d(ins[0], 2)
            elif kind == "up":
                out = L[f"up{i}"](ins[0]) if a[0] == "module" else F.interpolate(ins[0], scale_factor=2.0)
            elif kind == "pad":
                out = F.pad(ins[0], (1, 1, 1, 1))
            elif kind == "gap":
                out = ins[0].mean((2, 3)) if a[0] == "mean" else torch.flatten(F.adaptive_avg_pool2d(ins[0], 1), 1)
            elif kind == "flatten":
                out = L[f"flatten{i}"](ins[0]) if a[0] == "module" else (
                    torch.flatten(ins[0], 1) if a[0] == "torch" else ins[0].reshape(ins[0].shape[0], -1))
            elif kind == "linear":
                out = L[f"linear{i}"](ins[0])
            elif kind == "ln":
                out = L[f"ln{i}"](ins[0]) if a[0] == "flat" else (
                    L[f"ln{i}"](ins[0].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            elif kind == "gn":
                out = L[f"gn{i}"](ins[0])
            elif kind == "convT":
                out = L[f"convT{i}"](ins[0])
            elif kind in ("mha", "sdpa"):
                out = self._attention(i, op, ins[0])
            elif kind == "again":
                out = self._reuse(a[0], ins[0])
            else:  # pragma: no cover - the strategy draws only the kinds above
                raise AssertionError(kind)
            vals.append(out)
        outs = [vals[j] for j in self.arch.outputs]
        if self.arch.sink:
            for j in self.arch.dead_ends():
                outs[0] = outs[0] + vals[j].square().sum()
        return outs

    def _reuse(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Op ``j``'s module (created for op ``j``) called again, on ``x``."""
        op = self.arch.ops[j]
        module = self.layers[f"{op.kind}{j}"]
        if op.kind == "ln" and op.args[0] == "channels":
            return module(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return module(x)

    def _attention(self, i: int, op: Op, x: torch.Tensor) -> torch.Tensor:
        """Attention over the ``H*W`` tokens of map ``x``, back to a map.

        ``sizes``: ``"batch"`` takes B (and N) from ``x.shape`` at run time, ``"literal"``
        writes every size as a constant (the batch ``build`` makes).
        """
        L = self.layers
        c, h, w = self.arch.shapes[op.inputs[0]]
        sizes, residual = op.args[-2:]
        b, n = (x.shape[0], x.shape[2] * x.shape[3]) if sizes == "batch" else (self.arch.batch, h * w)
        t = x.flatten(2).transpose(1, 2)  # [B, N, C]
        if op.kind == "mha":
            y = L[f"mha{i}"](t, t, t, need_weights=False)[0]
        else:
            heads, d = op.args[:2]
            qkv = L[f"qkv{i}"](t).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            y = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d]
            y = L[f"proj{i}"](y.transpose(1, 2).reshape(b, n, heads * d))
        out = y.transpose(1, 2).reshape(b, c, h, w)
        return out + x if residual else out


class FuzzNet2(FuzzNet):
    """A ``FuzzNet`` of an ``Arch`` with two inputs."""

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self._forward([x, y])


def build(arch: Arch, batch: int | None = None, dtype: torch.dtype = torch.float64,
          seed: int = 0) -> tuple[FuzzNet, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """The model of ``arch`` (eval mode unless ``arch.training``, ``dtype``) and a random
    example input of ``arch.batch`` (or ``batch``) samples: a tensor, or a tuple of two
    for an ``Arch`` with two inputs (call ``model(*x)``)."""
    batch = arch.batch if batch is None else batch
    model = (FuzzNet2 if arch.c_in2 else FuzzNet)(arch, seed).to(dtype)
    model.train(arch.training)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, arch.c_in, arch.hw, arch.hw, generator=gen, dtype=dtype)
    if not arch.c_in2:
        return model, x
    return model, (x, torch.randn(batch, arch.c_in2, arch.hw, arch.hw, generator=gen, dtype=dtype))
