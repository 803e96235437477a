"""One-shot N:M pruning of a trained byte-level Transformer LM: magnitude, Wanda, SparseGPT
and AdaPrune at 2:4 and 4:8, plain, transposable and Bi-Mask; then a short sparse fine-tune.

Run: ``python benchmarks/oneshot.py [--fast] [--model lm|gpt2] [--out FILE]``.

1. Trains the Linen Transformer of ``examples/lm.py`` dense on the Python documentation
   bytes (:func:`nmjax.datasets.text`).
2. For each pattern converts every Dense kernel but the output head with
   :func:`nmjax.convert.wanda`, :func:`nmjax.convert.sparsegpt` and
   :func:`nmjax.convert.adaprune` (defaults; calibration: windows of the training bytes),
   the magnitude N:M model being the conversions' baseline, and measures the validation loss
   (nats per byte) and perplexity ``exp(loss)``.
3. Fine-tunes each pruned model for the same few steps with :func:`nmjax.optim.sparse`
   (masks fixed to the conversion's, static-mode sparse layers) and the dense model for as
   many steps with plain Adam (the control).
4. Converts with the method of the lowest 2:4 loss on calibration sets of growing size.

``--model gpt2`` runs the same on a Hugging Face ``FlaxGPT2LMHeadModel`` built from a tiny
config (byte vocabulary, random init, nothing downloads) and trained dense here with Adam:
every ``FlaxConv1D`` kernel (``c_attn``, ``c_proj``, ``c_fc``, ``c_proj``; stored ``(out,
in)``) is converted, the head being tied to the embedding and dense.

``--memory`` instead compiles SparseGPT's per-layer program for wide layers and prints
XLA's peak memory (no run).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import lm  # noqa: E402

import nmjax  # noqa: E402
from nmjax.convert import adaprune, sparsegpt, wanda  # noqa: E402
from nmjax.masks import BiMask, as_pattern  # noqa: E402
from nmjax.nn import collection  # noqa: E402
from nmjax.optim import masks_of, sparse  # noqa: E402
from nmjax.tree import MaskRule, apply_masks, build_masks  # noqa: E402

METHODS = {"wanda": wanda, "sparsegpt": sparsegpt, "adaprune": adaprune}
# What stays dense: the LM's 256-way head; GPT-2's head is tied to the embedding (dense by
# the plan).
EXCLUDE = {"lm": "head", "gpt2": ()}
PATTERNS = ("2:4", "4:8", "2:4 transposable", "4:8 transposable", "bimask 2:4")
FAST = dict(d_model=32, layers=1, context=32, steps=30, batch=8, eval_windows=32,
            train_limit=200_000, warmup=5, eval_every=30, calib=16, finetune_steps=5,
            patterns=("2:4",), sizes=(4, 16))
FULL = dict(d_model=128, layers=2, context=64, steps=2000, batch=16, eval_windows=512,
            train_limit=None, warmup=50, eval_every=500, calib=128, finetune_steps=200,
            patterns=PATTERNS, sizes=(8, 32, 128, 512))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _md_table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def gpt2_inputs(tokens):
    """GPT-2's positional inputs for a batch of token windows."""
    tokens = jnp.asarray(tokens)
    return (tokens, jnp.ones_like(tokens),
            jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))


def train_gpt2(cfg, data):
    """A tiny Hugging Face Flax GPT-2 (byte vocabulary) trained dense with the LM's recipe
    (Adam, warmup and cosine decay, gradient clipping, the same windows)."""
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    config = GPT2Config(vocab_size=256, n_positions=cfg.context, n_embd=cfg.d_model,
                        n_layer=cfg.layers, n_head=cfg.heads, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    hf = FlaxGPT2LMHeadModel(config, seed=cfg.seed)
    module = hf.module
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps,
                                                  cfg.lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))

    @jax.jit
    def step(params, state, windows):
        def loss(p):
            return lm._loss(module.apply({"params": p}, *gpt2_inputs(windows[:, :-1])).logits,
                            windows[:, 1:])

        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = hf.params, tx.init(hf.params)
    train = data.train if cfg.train_limit is None else data.train[:cfg.train_limit]
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.steps):
        starts = rng.integers(0, len(train) - cfg.context - 1, cfg.batch)
        params, state = step(params, state, lm._windows(train, starts, cfg.context))
    return module, params


class Bench:
    """The trained model, its data, and the evaluation and fine-tuning it shares."""

    def __init__(self, s, data):
        self.s, self.data = s, data
        cfg = lm.LMConfig(pattern="dense", steps=s["steps"], batch=s["batch"],
                          context=s["context"], d_model=s["d_model"], layers=s["layers"],
                          warmup=s["warmup"], eval_every=s["eval_every"],
                          eval_windows=s["eval_windows"], train_limit=s["train_limit"])
        self.gpt2 = s.get("model", "lm") == "gpt2"
        t0 = time.perf_counter()
        if self.gpt2:
            self.model, self.params = train_gpt2(cfg, data)
            self.inputs = gpt2_inputs
            self.logits = lambda out: out.logits
        else:
            self.params = lm.train(cfg, data, progress=False)["params"]
            self.model = lm.TransformerLM(cfg.d_model, cfg.heads, cfg.layers, cfg.context)
            self.inputs = lambda tokens: (tokens,)
            self.logits = lambda out: out
        self.train_s = time.perf_counter() - t0
        self.cfg = cfg
        predict = jax.jit(lambda p, tokens: self.logits(
            self.model.apply({"params": p}, *self.inputs(tokens))))
        self.predict = lambda p, _masks, tokens: predict(p, tokens)
        rng = np.random.default_rng(123)
        starts = rng.integers(0, len(data.train) - cfg.context - 1, max(s["sizes"]))
        self.calib = lm._windows(data.train, starts, cfg.context)[:, :-1]
        self.steps = {}

    def loss(self, params) -> float:
        """Validation loss (nats per byte); a pruned model's params are 0 outside its masks,
        so the dense model computes its forward pass."""
        return lm._evaluate(self.predict, params, None, self.data.val, self.cfg.context,
                            self.cfg.eval_windows)

    def _tx(self, rule, plan, lr, init_masks=None):
        steps = self.s["finetune_steps"]
        extra = {"perm_every": steps + 1} if isinstance(rule.pattern, BiMask) else {}
        return sparse(optax.adam(lr), plan, refresh_every=steps + 1, init_masks=init_masks,
                      **extra)

    def _step(self, rule, plan, lr):
        """One jitted step per pattern (the masks are data in the optimizer state)."""
        if rule not in self.steps:
            tx = self._tx(rule, plan, lr)
            net = nmjax.nn.sparsify(self.model, plan, mode="static")

            @jax.jit
            def step(params, state, windows):
                def loss(p):
                    out = net.apply({"params": p, "nm_masks": collection(state)},
                                    *self.inputs(windows[:, :-1]))
                    return lm._loss(self.logits(out), windows[:, 1:])

                grads = jax.grad(loss)(params)
                updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            self.steps[rule] = step
        return self.steps[rule]

    def _batches(self):
        rng = np.random.default_rng(7)
        for _ in range(self.s["finetune_steps"]):
            starts = rng.integers(0, len(self.data.train) - self.cfg.context - 1,
                                  self.cfg.batch)
            yield lm._windows(self.data.train, starts, self.cfg.context)

    def finetune(self, rule, plan, params, masks, lr=3e-4):
        """``finetune_steps`` of Adam through :func:`nmjax.optim.sparse` on the conversion's
        ``plan``, masks fixed to ``masks``; the same batches for every model. Returns the
        masked parameters."""
        step = self._step(rule, plan, lr)
        state = self._tx(rule, plan, lr, init_masks=masks).init(params)
        for windows in self._batches():
            params, state = step(params, state, windows)
        return apply_masks(params, masks_of(state))

    def finetune_dense(self, lr=3e-4):
        tx = optax.adam(lr)

        @jax.jit
        def step(params, state, windows):
            grads = jax.grad(lambda p: lm._loss(self.logits(self.model.apply(
                {"params": p}, *self.inputs(windows[:, :-1]))), windows[:, 1:]))(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        params, state = self.params, tx.init(self.params)
        for windows in self._batches():
            params, state = step(params, state, windows)
        return params


def convert(bench, method, rule, calib):
    t0 = time.perf_counter()
    conv = METHODS[method]((bench.model, bench.params), bench.inputs(calib), rule,
                           progress=False)
    return conv, time.perf_counter() - t0


def run(s) -> str:
    t_start = time.perf_counter()
    data = nmjax.datasets.text()
    bench = Bench(s, data)
    dense = bench.loss(bench.params)
    log(f"dense: val loss {dense:.4f} ({bench.train_s:.0f} s)")
    calib = bench.calib[:s["calib"]]
    t0 = time.perf_counter()
    dense_ft = bench.loss(bench.finetune_dense())
    log(f"dense + fine-tune: {dense_ft:.4f} ({time.perf_counter() - t0:.0f} s)")

    rows, ft_rows, time_rows, errors, by_pattern = [], [], [], {}, {}
    tuned_by_pattern = {}
    for pattern in s["patterns"]:
        rule = MaskRule(as_pattern(pattern), exclude=EXCLUDE[s.get("model", "lm")])
        losses, tuned, seconds = {}, {}, {}
        convs = {}
        for method in METHODS:
            convs[method], seconds[method] = convert(bench, method, rule, calib)
            losses[method] = bench.loss(convs[method].params)
            log(f"{pattern} {method}: {losses[method]:.4f} ({seconds[method]:.1f} s)")
        magnitude = convs["wanda"].magnitude_params
        losses = {"magnitude": bench.loss(magnitude), **losses}
        by_pattern[pattern] = losses
        plan = convs["wanda"].plan          # the layers and axes every conversion resolved
        starts = {"magnitude": (magnitude, build_masks(bench.params, plan)),
                  **{k: (c.params, c.masks) for k, c in convs.items()}}
        t0 = time.perf_counter()
        for method, (params, masks) in starts.items():
            tuned[method] = bench.loss(bench.finetune(rule, plan, params, masks))
        tune_s = time.perf_counter() - t0
        log(f"{pattern} fine-tuned: {tuned} ({tune_s:.0f} s)")
        order = ("magnitude", *METHODS)
        rows.append((pattern, *(f"{losses[k]:.4f} / {math.exp(losses[k]):.3f}" for k in order)))
        tuned_by_pattern[pattern] = tuned
        ft_rows.append((pattern, *(f"{tuned[k]:.4f}" for k in order), f"{dense_ft:.4f}"))
        time_rows.append((pattern, *(f"{seconds[k]:.1f}" for k in METHODS), f"{tune_s:.0f}"))
        errors[pattern] = {k: float(np.mean([r.error_adaprune for r in c.layers]))
                           for k, c in convs.items()}
        errors[pattern]["magnitude"] = float(np.mean([r.error_magnitude
                                                      for r in convs["wanda"].layers]))

    # The calibration-set size curve of the best method at 2:4.
    rule = MaskRule("2:4", exclude=EXCLUDE[s.get("model", "lm")])
    best = min(METHODS, key=lambda k: by_pattern["2:4"][k])
    tuned_24 = tuned_by_pattern["2:4"]
    curve = []
    for size in s["sizes"]:
        conv, sec = convert(bench, best, rule, bench.calib[:size])
        loss = bench.loss(conv.params)
        curve.append((size, f"{size * s['context']}", f"{loss:.4f}", f"{math.exp(loss):.3f}",
                      f"{sec:.1f}"))
        log(f"calibration {size}: {loss:.4f}")
    total = time.perf_counter() - t_start

    n_params = sum(x.size for x in jax.tree.leaves(bench.params))
    what = ("Hugging Face `FlaxGPT2LMHeadModel` (transformers "
            f"{_version('transformers')}) from a tiny config, byte vocabulary, "
            if bench.gpt2 else "`examples/lm.py`'s Transformer, ")
    converted = ("every `FlaxConv1D` kernel (c_attn, attn c_proj, c_fc, mlp c_proj of each "
                 "block, stored (out, in)); the head is tied to the embedding and stays dense"
                 if bench.gpt2 else "every Dense kernel but the 256-way head (query, key, "
                 "value, out, mlp_in, mlp_out of each block)")
    out = [
        f"Model: {what}d_model {s['d_model']}, {s['layers']} "
        f"block(s), context {s['context']}, {n_params} parameters; trained dense for "
        f"{s['steps']} steps of batch {s['batch']} in {bench.train_s:.0f} s on "
        f"{data.name}. Converted: {converted}. Calibration: {s['calib']} training "
        f"windows of {s['context']} bytes; validation loss in nats per byte over "
        f"{s['eval_windows']} windows, perplexity = exp(loss). Conversions with their "
        "defaults (SparseGPT damping 0.01, block 128; AdaPrune solver auto), sequential. "
        f"Total {total:.0f} s.",
        "", "## One-shot: validation loss / perplexity", "",
        f"Dense: {dense:.4f} / {math.exp(dense):.3f}.", "",
        _md_table(("pattern", "magnitude", "Wanda", "SparseGPT", "AdaPrune"), rows),
        "", "Mean relative output error of the converted layers (calibration inputs): "
        + "; ".join(f"{p}: " + ", ".join(f"{k} {v:.3f}" for k, v in e.items())
                    for p, e in errors.items()) + ".",
        "", f"## After {s['finetune_steps']} fine-tuning steps (validation loss)", "",
        _md_table(("pattern", "magnitude", "Wanda", "SparseGPT", "AdaPrune",
                   "dense + same steps (control)"), ft_rows),
        "", f"Fine-tune: Adam 3e-4, batch {s['batch']}, the same batches for every model, "
        "through `nmjax.optim.sparse` with the masks fixed to the conversion's (Bi-Mask: "
        "its permutation too) on the static-mode sparse model; the dense control is the "
        "dense model given the same steps with plain Adam.",
        "", "## Conversion time (s, compilation included)", "",
        _md_table(("pattern", "Wanda", "SparseGPT", "AdaPrune", "all fine-tunes"),
                  time_rows),
        "", f"## Calibration-set size ({best}, 2:4)", "",
        _md_table(("windows", "bytes", "val loss", "perplexity", "s"), curve),
        "", "## The issue's targets, read off the tables above", "",
        *targets(dense, by_pattern, tuned_24),
    ]
    return "\n".join(out)


def _version(name):
    from importlib.metadata import version

    return version(name)


def targets(dense, by_pattern, tuned_24) -> list[str]:
    """The papers' ordering and the issue's targets, as measured (yes / no with the numbers)."""
    ppl = {p: {k: math.exp(v) for k, v in losses.items()} for p, losses in by_pattern.items()}
    p24 = ppl["2:4"]
    order = p24["sparsegpt"] <= p24["wanda"] <= p24["magnitude"]
    lines = [f"- SparseGPT <= Wanda <= magnitude in perplexity at 2:4: "
             f"**{'yes' if order else 'no'}** ({p24['sparsegpt']:.3f} / {p24['wanda']:.3f} / "
             f"{p24['magnitude']:.3f})."]
    if "2:4 transposable" in ppl:
        base = math.exp(dense)
        plain = p24["sparsegpt"] - base
        trans = ppl["2:4 transposable"]["sparsegpt"] - base
        lines.append(f"- Transposable 2:4 SparseGPT within 5% of plain 2:4 SparseGPT's "
                     f"perplexity increase over dense: **{'yes' if trans <= 1.05 * plain else 'no'}"
                     f"** (+{trans:.3f} vs +{plain:.3f}, ratio {trans / plain:.2f}).")
    best = min((k for k in tuned_24 if k != "magnitude"), key=tuned_24.get)
    below = tuned_24[best] < tuned_24["magnitude"]
    lines.append(f"- After fine-tuning, the best one-shot start ({best}, 2:4) below magnitude "
                 f"with the same steps: **{'yes' if below else 'no'}** "
                 f"({tuned_24[best]:.4f} vs {tuned_24['magnitude']:.4f}).")
    return lines


def memory(dims) -> str:
    """XLA's memory analysis of SparseGPT's per-layer program (compiled, never run)."""
    from nmjax import _convert_solve, _oneshot
    from nmjax.masks import NM

    rows = []
    for d, out, samples in dims:
        geom = _convert_solve.Geometry("dense", (d, out))
        x = jax.ShapeDtypeStruct((samples, d), jnp.float32)
        w = jax.ShapeDtypeStruct((d, out), jnp.float32)
        t0 = time.perf_counter()
        compiled = _oneshot.sparsegpt.lower(geom, (x,), w, jnp.float32(0.01), pattern=NM(2, 4),
                                            block=128, progress=False).compile()
        stats = compiled.memory_analysis()
        peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                + stats.temp_size_in_bytes)
        rows.append((f"{d} x {out}", samples, f"{stats.temp_size_in_bytes / 2**30:.2f}",
                     f"{peak / 2**30:.2f}", f"{4 * d * d / 2**30:.2f}",
                     f"{time.perf_counter() - t0:.0f}"))
        log(rows[-1])
    return ("XLA's memory analysis of `nmjax._oneshot.sparsegpt` compiled for the CPU (2:4, "
            "block 128), per layer (`in x out`, calibration rows):\n\n"
            + _md_table(("layer", "rows", "temp GiB", "arguments + outputs + temp GiB",
                         "one d x d float32 GiB", "compile s"), rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--memory", action="store_true",
                        help="compile SparseGPT for wide layers and print XLA's peak memory")
    parser.add_argument("--out", help="write the markdown here (default: stdout)")
    parser.add_argument("--model", choices=("lm", "gpt2"), default="lm",
                        help="examples/lm.py's Transformer or a tiny Hugging Face GPT-2")
    for key, value in FULL.items():
        if isinstance(value, int):
            parser.add_argument(f"--{key.replace('_', '-')}", type=int)
    args = parser.parse_args(argv)
    s = dict(FAST if args.fast else FULL, model=args.model)
    s.update({k: v for k, v in vars(args).items() if k in s and v is not None})
    load = os.getloadavg()
    started = datetime.datetime.now(datetime.UTC)
    if args.memory:
        dims = ((1024, 1024, 4096),) if args.fast else (
            (4096, 4096, 16384), (8192, 8192, 16384), (16384, 4096, 16384),
            (32768, 8192, 16384), (40960, 8192, 16384))
        body = memory(dims)
    else:
        body = run(s)
    command = "python benchmarks/oneshot.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other work), "
               f"jax {jax.__version__} on {jax.devices()[0].platform}")
    mode = "fast mode (smoke settings, not the full benchmark)" if args.fast else "full mode"
    text = (f"# One-shot N:M pruning ({mode})\n\n"
            f"Command: `{command.strip()}`. Machine: {machine}. Load average at start "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at end "
            + " ".join(f"{v:.2f}" for v in os.getloadavg())
            + f". Date: {started:%Y-%m-%d %H:%M} UTC.\n\n{body}\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
