"""The end-to-end demo behind ``bebop demo`` and the README's first command.

Held-out prompts from the three domains (math, code, agentic) run on two engines of the
default model — no speculation, and method "bebop" with the shipped heads — one request at a
time and then as one batch. Prints, per request, tokens/s on both engines, bebop's
acceptance rate, mean accepted length and the target's mean entropy; then median batch-1
tokens/s, batched tokens/s and their ratios (measured in the same run, back to back).

Each engine lives in its own worker process (vLLM runs one engine per process best); both are
started together, and every measurement runs the two engines back to back so machine-load
drifts hit both alike.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bebop_vllm.errors import BebopError

ENGINES = ("none", "bebop")
START_TIMEOUT_S = 600


def _worker(engine: str, model: str, heads: str | None, k: int, max_model_len: int,
            seed: int, dtype: str, conn: Any) -> None:
    """Hold one engine; answer ("run", texts, params) with (seconds, [per-request dicts])."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from vllm import LLM, SamplingParams

        kwargs: dict[str, Any] = {}
        if engine == "bebop":
            kwargs["speculative_config"] = {"method": "bebop", "model": heads,
                                            "num_speculative_tokens": k}
            kwargs["per_request_spec_decode_metrics"] = "summary"
        llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
                  seed=seed, **kwargs)
        llm.generate(["Hello"], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one clear line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, texts, params = msg
        sp = SamplingParams(**params)
        t0 = time.perf_counter()
        outs = llm.generate(texts, sp, use_tqdm=False)
        seconds = time.perf_counter() - t0
        results = []
        for o in outs:
            c = o.outputs[0]
            spec = c.spec_decode_metrics.to_dict() if c.spec_decode_metrics is not None else None
            results.append({"tokens": len(c.token_ids), "text": c.text, "spec": spec})
        conn.send(("done", (seconds, results)))


class _Engine:
    """Parent-side handle of one worker process."""

    def __init__(self, ctx: Any, engine: str, args: argparse.Namespace, model: str,
                 heads: str | None) -> None:
        self.name = engine
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, daemon=True, args=(
            engine, model, heads, args.num_speculative_tokens, args.max_model_len, args.seed,
            args.dtype, child))
        self.proc.start()

    def wait_ready(self) -> None:
        if not self.conn.poll(START_TIMEOUT_S):
            raise BebopError(f"the {self.name} engine did not start within {START_TIMEOUT_S}s")
        kind, detail = self.conn.recv()
        if kind == "error":
            raise BebopError(f"the {self.name} engine failed to start: {detail}")

    def run(self, texts: list[str], params: dict[str, Any]) -> tuple[float, list[dict]]:
        self.conn.send(("run", texts, params))
        kind, payload = self.conn.recv()
        return payload

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=10)


def _resolve_heads(heads: str | None, model: str, tmp: Path, k: int) -> tuple[str, str]:
    """(heads dir, label). ``random`` builds untrained heads (plumbing demo, low acceptance)."""
    from bebop_vllm.paths import SHIPPED_HEADS_DIR

    if heads == "random":
        from bebop_vllm.heads import init_random_heads

        return str(init_random_heads(model, tmp / "random_heads", num_depths=k, seed=0)), \
            "random (untrained) heads"
    path = Path(heads) if heads else SHIPPED_HEADS_DIR
    if heads is None and not (path / "model.safetensors").is_file():
        print(f"bebop demo: NOTE: shipped heads not found at {path}; using RANDOM, untrained "
              "heads instead (acceptance will be near 0, so bebop will be slower). Train heads "
              "with `bebop train` or pass --heads DIR.", flush=True)
        return _resolve_heads("random", model, tmp, k)
    if not (path / "model.safetensors").is_file():
        raise BebopError(f"heads folder {path} not found (no model.safetensors); train them with "
                         "`bebop train`, pass --heads DIR, or --heads random for an untrained "
                         "plumbing demo")
    return str(path), str(path)


def _fitting_prompts(tok: Any, domains: Any, per_domain: int, max_prompt_tokens: int,
                     load_prompts: Any, render: Any) -> tuple[list, list[str]]:
    """The first ``per_domain`` held-out prompts of each domain that fit the context.

    Some agentic prompts (long tool lists) exceed a small engine's context; they are skipped,
    not truncated, so every request is a real held-out prompt.
    """
    chosen, texts, skipped = [], [], 0
    counts: dict[str, int] = {}
    for p in load_prompts(domains, "heldout", limit_per_domain=per_domain * 20):
        if counts.get(p.domain, 0) >= per_domain:
            continue
        text = render(p, tok)
        if len(tok(text).input_ids) > max_prompt_tokens:
            skipped += 1
            continue
        counts[p.domain] = counts.get(p.domain, 0) + 1
        chosen.append(p)
        texts.append(text)
    missing = [d for d in domains if counts.get(d, 0) == 0]
    if missing:
        raise BebopError(f"no held-out prompt of {missing} fits {max_prompt_tokens} prompt tokens; "
                         "raise --max-model-len")
    if skipped:
        print(f"  (skipped {skipped} held-out prompts longer than {max_prompt_tokens} tokens)")
    return chosen, texts


def _sum_lists(lists: list[list[int] | None]) -> list[int]:
    """Element-wise sum of the non-empty lists (per-position counts over requests)."""
    present = [x for x in lists if x]
    return [sum(col) for col in zip(*present, strict=True)] if present else []


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def run_demo(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from bebop_vllm.data import DOMAINS, load_prompts, render
    from bebop_vllm.hardware import fast_engine_dtype
    from bebop_vllm.model_fetch import check_model_dir
    from bebop_vllm.paths import default_model_dir

    model = args.model or str(default_model_dir())
    if args.model is None and (why := check_model_dir(default_model_dir())) is not None:
        raise BebopError(f"default model not ready ({why}); run `bebop fetch-model` first")
    if args.prompts_per_domain < 1 or args.max_tokens < 1 or args.batch < 1:
        raise BebopError("--prompts-per-domain, --max-tokens and --batch must be >= 1")
    tmp = Path(tempfile.mkdtemp(prefix="bebop-demo-"))
    heads, heads_label = _resolve_heads(args.heads, model, tmp, args.num_speculative_tokens)
    tok = AutoTokenizer.from_pretrained(model)
    prompts, texts = _fitting_prompts(tok, DOMAINS, args.prompts_per_domain,
                                      args.max_model_len - args.max_tokens, load_prompts, render)
    params = {"temperature": args.temperature, "max_tokens": args.max_tokens, "seed": args.seed,
              "ignore_eos": True}
    # bf16 only where the hardware computes it natively: vLLM's CPU path emulates bf16 on
    # AVX2-only x86 and decodes ~3x slower there than in float32.
    args.dtype = fast_engine_dtype()

    print(f"bebop demo: {model}\n  heads: {heads_label}, k={args.num_speculative_tokens}, "
          f"T={args.temperature}, {args.max_tokens} new tokens per request, {args.dtype}; "
          "starting engines ...",
          flush=True)
    from bebop_vllm.serve import ensure_cpu_kv_cache_space

    ensure_cpu_kv_cache_space("1")  # two engines share the host
    ctx = mp.get_context("spawn")
    engines = {name: _Engine(ctx, name, args, model, heads) for name in ENGINES}
    try:
        for e in engines.values():
            e.wait_ready()
        _report(engines, prompts, texts, params, args.batch)
    finally:
        for e in engines.values():
            e.stop()
    return 0


def _report(engines: dict[str, _Engine], prompts: list, texts: list[str], params: dict[str, Any],
            batch: int) -> None:
    print(f"\n== batch 1: {len(prompts)} held-out prompts ==")
    print(f"{'domain':8s} {'prompt':28s} {'none tok/s':>10s} {'bebop tok/s':>11s} {'speedup':>7s} "
          f"{'accept':>6s} {'mean len':>8s} {'H nats':>6s}")
    rates: dict[str, list[float]] = {name: [] for name in engines}
    specs: list[dict] = []
    for p, text in zip(prompts, texts, strict=True):
        row = {}
        for name, e in engines.items():
            seconds, (res,) = e.run([text], params)
            row[name] = (res["tokens"] / seconds, res)
            rates[name].append(res["tokens"] / seconds)
        spec = row["bebop"][1]["spec"] or {}
        specs.append(spec)
        print(f"{p.domain:8s} {str(p.id)[:28]:28s} {row['none'][0]:10.1f} {row['bebop'][0]:11.1f} "
              f"{row['bebop'][0] / row['none'][0]:6.2f}x "
              f"{_fmt(spec.get('draft_acceptance_rate')):>6s} "
              f"{_fmt(spec.get('mean_acceptance_length')):>8s} "
              f"{_fmt(spec.get('mean_target_entropy')):>6s}", flush=True)
    sample = row["bebop"][1]["text"].replace("\n", " ")[:150]
    print(f"  (last bebop answer: {sample!r})")

    batch_texts = (texts * (batch // len(texts) + 1))[:batch]
    batch_rate = {}
    for name, e in engines.items():
        seconds, results = e.run(batch_texts, params)
        batch_rate[name] = sum(r["tokens"] for r in results) / seconds

    med = {name: statistics.median(v) for name, v in rates.items()}
    drafted = _sum_lists([s.get("num_draft_tokens_per_pos") for s in specs])
    accepted = _sum_lists([s.get("num_accepted_tokens_per_pos") for s in specs])
    print("\n== summary (tokens/s measured back to back in this run) ==")
    print(f"batch 1 median:  none {med['none']:.1f}  bebop {med['bebop']:.1f}  "
          f"-> {med['bebop'] / med['none']:.2f}x")
    print(f"batch {batch}:       none {batch_rate['none']:.1f}  bebop {batch_rate['bebop']:.1f}  "
          f"-> {batch_rate['bebop'] / batch_rate['none']:.2f}x")
    if drafted:
        per_pos = "  ".join(f"pos{i + 1} {a / d:.2f}" if d else f"pos{i + 1} -"
                            for i, (a, d) in enumerate(zip(accepted, drafted, strict=True)))
        print(f"bebop acceptance per draft position (batch-1 requests): {per_pos}")
