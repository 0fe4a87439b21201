"""Reproduce the Bebop paper's findings on our model (docs/study.md): one command, resumable.

    .venv/bin/python benchmarks/acceptance_study.py            # the full study (41 min on 2 AVX2 cores)
    .venv/bin/python benchmarks/acceptance_study.py --report-only   # rewrite study.md from study.json
    .venv/bin/python benchmarks/acceptance_study.py --quick    # the whole pipeline on a few prompts (CI)

Two measurement sources, labelled everywhere:

(a) *analytic* (teacher-forced, PyTorch): held-out prompts of math/code/agentic, continuations
    sampled by the target in vLLM at each temperature; per request the target's mean entropy
    and the heads' expected acceptance for probabilistic drafting (alpha = sum min(p, q)) and
    greedy drafting (alpha = p(argmax q)) per depth; E[tau] = 1 + sum_j prod_{i<=j} alpha_i.
    Claims 1-3 and the entropy -> accepted-length predictor.
(b) *engine* (vLLM with the bebop method): batch-1 tokens/s of each head and draft mode next to
    no speculation in the same run, with vLLM's per-request measured acceptance; claim 4, and a
    cross-check of (a) on the very tokens the engine generated.

Every stage caches its result under ``<out>/cache`` (keyed by the settings it depends on): a
rerun after an interruption recomputes only what is missing. Outputs: ``<out>/study.json``,
``<out>/study.md`` and PNG figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study.common import (  # noqa: E402
    LOSS_ORDER,
    MODES,
    SHIPPED_HEAD_NAME,
    StageCache,
    StudyConfig,
    discover_heads,
    head_metadata,
    result_key,
)

from bebop_vllm.paths import SHIPPED_HEADS_DIR  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "study"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Reproduce the Bebop paper's claims on the default model: (1) entropy bounds acceptance, "
        "(2) rejection sampling beats greedy drafting as entropy rises, (3) e2e-TV heads beat CE/KL heads, "
        "(4) throughput follows acceptance. Resumable (per-stage cache in OUT/cache); writes study.json, "
        "study.md and PNG plots to OUT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (results, plots, stage cache)")
    p.add_argument("--model", type=Path, default=None, help="target model folder (default: the fetched SmolLM2-135M)")
    p.add_argument(
        "--heads", action="append", default=[], metavar="LOSS=DIR",
        help="a head folder per loss (repeatable); default: every heads/smollm2-135m-<loss>/ in the repo",
    )
    p.add_argument("--primary", default=SHIPPED_HEAD_NAME,
                   help="head used for claims 1, 2, 4 and the predictor, if it exists (default: the shipped heads, "
                   f"{SHIPPED_HEADS_DIR.name})")
    p.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
        help="dtype of the vLLM engines (sampling and timed runs). auto: bfloat16 (the model's own) on "
        "CUDA or CPUs with bf16 instructions (avx512_bf16 / amx_bf16), else float32, which decodes ~3x "
        "faster than emulated bf16 on AVX2-only CPUs; the report records the dtype used",
    )
    p.add_argument("--quick", action="store_true", help="whole pipeline on a few prompts and tokens (CI, < 3 min)")
    p.add_argument("--domains", default="math,code,agentic", help="comma-separated prompt domains")
    p.add_argument("--prompts-per-domain", type=int, default=None, help="held-out prompts per domain (full: 8)")
    p.add_argument(
        "--source", choices=["sampled", "heads-heldout"], default="sampled",
        help="held-out sequences: 'sampled' = continuations sampled by the target at every temperature (vLLM); "
        "'heads-heldout' = the heads' held-out set ($BEBOP_HOME/data/.../heldout, sampled at T=1) evaluated at "
        "every temperature (cheaper: reuses its cached target hidden states; contexts stay T=1 samples)",
    )
    p.add_argument("--analytic-prompts-per-domain", type=int, default=None,
                   help="teacher-force only the first N sampled prompts per domain (default: all of them)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="skip longer prompts (full: 320)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="sampled continuation length (full: 128)")
    p.add_argument("--temperatures", default=None, help="comma-separated sweep (full: 0.3,0.5,0.7,1.0,1.3)")
    p.add_argument("--compare-temperatures", default=None, help="claim 3 temperatures (full: 0.7,1.0)")
    p.add_argument("--depth", type=int, default=None, help="draft depth g (default: the primary head's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-engine", action="store_true", help="skip the vLLM speculative runs (claim 4, cross-check)")
    p.add_argument("--engine-prompts-per-domain", type=int, default=None, help="timed requests per domain (full: 2)")
    p.add_argument("--engine-max-new-tokens", type=int, default=None, help="tokens per timed request (full: 128)")
    p.add_argument("--engine-temperatures", default=None, help="timed temperatures (full: 1.0)")
    p.add_argument(
        "--engine-configs", default=None,
        help="comma-separated LOSS:MODE[:K] run in vLLM, MODE probabilistic|greedy, K draft tokens (default g) "
        "(full: primary with both modes, primary probabilistic with K=1 and 2, every other head probabilistic)",
    )
    p.add_argument("--engines-at-once", type=int, default=4,
                   help="engines alive at a time (memory: ~2 GB each); every group includes no speculation")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the analytic part (default: all; 1 when the load exceeds the CPU count)")
    p.add_argument("--analytic-budget-min", type=float, default=None,
                   help="stop teacher-forcing new sequences after this many minutes of the run and report what is "
                   "done (marked incomplete; a rerun continues)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite OUT/study.md from OUT/study.json (no computation; e.g. after a report change)")
    p.add_argument("--only-samples", action="store_true",
                   help="stop after sampling the held-out continuations and computing their target hidden states "
                   "(head-independent; a later run reuses both)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing engine run instead of "
                   "recording the failure and going on")
    return p.parse_args(argv)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_config(args: argparse.Namespace) -> StudyConfig:
    from bebop_vllm.errors import BebopError
    from bebop_vllm.hardware import fast_engine_dtype
    from bebop_vllm.paths import default_model_dir

    model_dir = (args.model or default_model_dir()).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise BebopError(f"target model folder {model_dir} has no config.json; run `bebop fetch-model` first")
    heads = {k: str(v) for k, v in discover_heads().items()}
    for item in args.heads:
        if "=" not in item:
            raise BebopError(f"--heads wants LOSS=DIR, got {item!r}")
        loss, d = item.split("=", 1)
        heads[loss] = str(Path(d).expanduser().resolve())
    if not heads and not args.only_samples:
        # No trained heads anywhere: run the pipeline with random heads (labelled as such).
        from bebop_vllm.heads import init_random_heads

        d = args.out / "cache" / "random-init-heads"
        if not (d / "bebop.json").is_file():
            init_random_heads(model_dir, d, num_depths=args.depth or 3)
        heads = {"random-init": str(d.resolve())}
    primary = args.primary if args.primary in heads or not heads else next(iter(heads))
    depth = args.depth or int(head_metadata(heads[primary]).get("num_depths", 3) if heads else 3)
    q = args.quick
    temps = _floats(args.temperatures) if args.temperatures else ([0.5, 1.0] if q else [0.3, 0.5, 0.7, 1.0, 1.3])
    compare = _floats(args.compare_temperatures) if args.compare_temperatures else ([1.0] if q else [0.7, 1.0])
    engine_temps = _floats(args.engine_temperatures) if args.engine_temperatures else [1.0]
    if args.engine_configs:
        configs = []
        for item in args.engine_configs.split(","):
            loss, mode, *k = item.split(":")
            if loss not in heads or mode not in MODES or len(k) > 1 or (k and not k[0].isdigit()):
                raise BebopError(f"--engine-configs item {item!r}: LOSS:MODE[:K] with LOSS in {sorted(heads)}, "
                                 f"MODE in {list(MODES)}")
            configs.append((loss, mode, int(k[0]) if k else depth))
    elif not heads:
        configs = []
    else:
        configs = [(primary, "probabilistic", depth), (primary, "greedy", depth)]
        if not q:
            configs += [(h, "probabilistic", depth) for h in heads if h != primary]
            configs += [(primary, "probabilistic", k) for k in range(1, depth)]
    if args.engines_at_once < 2:
        raise BebopError("--engines-at-once must be at least 2 (no speculation + one speculative engine)")
    for t in [*temps, *compare, *engine_temps]:
        if t <= 0:
            raise BebopError(f"temperatures must be > 0 (sampled decoding), got {t}")
    missing_compare = [t for t in compare if not any(abs(t - x) < 1e-9 for x in temps)]
    temps = sorted(set(temps) | set(missing_compare))
    return StudyConfig(
        model_dir=str(model_dir),
        heads=heads,
        primary=primary,
        domains=[d.strip() for d in args.domains.split(",") if d.strip()],
        prompts_per_domain=args.prompts_per_domain or (1 if q else 8),
        max_prompt_tokens=args.max_prompt_tokens or (256 if q else 320),
        max_new_tokens=args.max_new_tokens or (24 if q else 128),
        temperatures=temps,
        compare_temperatures=compare,
        num_depths=depth,
        seed=args.seed,
        engine=not args.no_engine,
        engine_prompts_per_domain=args.engine_prompts_per_domain or (1 if q else 2),
        engine_max_new_tokens=args.engine_max_new_tokens or (16 if q else 128),
        engine_temperatures=engine_temps,
        engine_configs=configs,
        engines_at_once=args.engines_at_once,
        analytic_prompts_per_domain=args.analytic_prompts_per_domain,
        source=args.source,
        quick=q,
        dtype=fast_engine_dtype() if args.dtype == "auto" else args.dtype,
    )


# -- stages -------------------------------------------------------------------------------------
def select_study_prompts(cfg: StudyConfig) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from bebop_vllm.train.generate import select_prompts

    tok = AutoTokenizer.from_pretrained(cfg.model_dir)
    rows = select_prompts(tok, "heldout", cfg.domains, cfg.prompts_per_domain, cfg.max_prompt_tokens)
    return [{"domain": d, "prompt_id": pid, "ids": ids} for d, pid, ids in rows]


def heads_heldout(cfg: StudyConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The heads' held-out split as (prompts, samples at every evaluation temperature, hidden states).

    Sequences were sampled once at T = 1 by ``bebop generate-data``; each is evaluated at every
    temperature of the sweep (p and q tempered at T). Hidden states come read-only from the
    dataset's fp16 cache when it covers the sequence."""
    import numpy as np
    import torch

    from bebop_vllm.train.dataset import default_data_dir, load_split
    from bebop_vllm.train.target_cache import _model_key

    data_dir = default_data_dir()
    seqs = load_split(data_dir, "heldout")
    items = seqs.meta["items"]
    prompts, samples, hidden = [], [], {}
    hpath = data_dir / "heldout" / f"hidden-{_model_key(Path(cfg.model_dir))}.f16"
    state = hpath.with_suffix(".json")
    done = set(json.loads(state.read_text())["done"]) if state.is_file() else set()
    arr = None
    if hpath.is_file() and done:
        h = int(json.loads((Path(cfg.model_dir) / "config.json").read_text())["hidden_size"])
        arr = np.memmap(hpath, dtype=np.float16, mode="r", shape=(len(seqs.tokens), h))
    for i in range(len(seqs)):
        if items[i]["domain"] not in cfg.domains:
            continue
        toks = seqs.sequence(i).astype(int).tolist()
        plen = int(seqs.prompt_lens[i])
        pi = len(prompts)
        prompts.append({"domain": items[i]["domain"], "prompt_id": items[i]["id"], "ids": toks[:plen],
                        "sampled_temperature": float(seqs.temperatures[i])})
        for t in cfg.temperatures:
            samples.append({"temperature": t, "prompt_index": pi, "tokens": toks[plen:], "finish_reason": None})
        if arr is not None and i in done:
            hidden[json.dumps(toks)] = torch.from_numpy(
                np.asarray(arr[seqs.offsets[i] : seqs.offsets[i + 1]], dtype=np.float32))
    return prompts, samples, hidden


def engine_prompts(cfg: StudyConfig, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in cfg.domains:
        out += [p for p in prompts if p["domain"] == d][: cfg.engine_prompts_per_domain]
    return out


def _max_model_len(cfg: StudyConfig) -> int:
    new = max(cfg.max_new_tokens, cfg.engine_max_new_tokens)
    return min(2048, cfg.max_prompt_tokens + new + 2 * cfg.num_depths + 8)


def engine_name(loss: str, mode: str, k: int, depth: int) -> str:
    return f"bebop-{loss}-{mode}" + (f"-k{k}" if k != depth else "")


def engine_specs(cfg: StudyConfig, with_spec: bool) -> dict[str, dict[str, Any]]:
    """Engine name -> its settings: ``none`` (no speculation) and one per (head, draft mode)."""
    from study.engine import speculative_config

    base = {"model": cfg.model_dir, "max_model_len": _max_model_len(cfg), "seed": cfg.seed, "dtype": cfg.dtype}
    specs = {"none": dict(base, speculative_config=None)}
    if with_spec:
        for loss, mode, k in cfg.engine_configs:
            specs[engine_name(loss, mode, k, cfg.num_depths)] = dict(
                base, speculative_config=speculative_config(cfg.heads[loss], mode, k), loss=loss, mode=mode, k=k
            )
    return specs


def stage_sample(cfg: StudyConfig, prompts: list[dict[str, Any]], pool: Any) -> list[dict[str, Any]]:
    """The no-speculation engine samples one continuation per (held-out prompt, temperature)."""
    if "none" not in pool.names():
        raise RuntimeError(f"the no-speculation engine did not start: {pool.errors.get('none')}")
    ids, params, index = [], [], []
    for t in cfg.temperatures:
        for i, p in enumerate(prompts):
            ids.append(p["ids"])
            # no per-request seeds: they crash vLLM 0.32 on CPU ("CPU Generator does not use offset");
            # the engine seed (LLM(seed=...)) makes a rerun of the same batch reproducible instead
            params.append({"temperature": t, "max_tokens": cfg.max_new_tokens})
            index.append((t, i))
    t0 = time.time()
    outs = pool.sample("none", ids, params)
    print(f"[samples] {len(outs)} continuations in {time.time() - t0:.0f} s", file=sys.stderr)
    return [{"temperature": t, "prompt_index": i, "tokens": toks, "finish_reason": fin}
            for (t, i), (toks, fin) in zip(index, outs, strict=True)]


def stage_timed(cfg: StudyConfig, prompts: list[dict[str, Any]], specs: dict[str, Any], log_dir: Path,
                pool: Any = None) -> dict[str, Any]:
    """Batch-1 timing in groups of ``engines_at_once`` engines alive together, each group with its
    own no-speculation engine: every request runs on every engine of the group back to back, in
    rotating order; a speculative engine's speedup is measured against its group's baseline."""
    from study.engine import EnginePool
    from tqdm import tqdm

    eprompts = engine_prompts(cfg, prompts)
    spec_names = [n for n in specs if n != "none"]
    size = cfg.engines_at_once - 1
    groups = [spec_names[i : i + size] for i in range(0, len(spec_names), size)] or [[]]
    requests = [(t, i) for t in cfg.engine_temperatures for i in range(len(eprompts))]
    engines: dict[str, Any] = {}
    bar = tqdm(total=len(requests) * sum(len(g) + 1 for g in groups), desc="timed requests x engines", unit="req",
               dynamic_ncols=True)
    for gi, group in enumerate(groups):
        # the pool that sampled (no speculation + the first group) is reused for group 0
        own = pool is None or gi > 0
        gpool = EnginePool({n: specs[n] for n in ["none", *group]}, log_dir) if own else pool
        try:
            names = gpool.names()
            rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            if "none" in names:
                for n, (t, i) in enumerate(requests):
                    params = {"temperature": t, "max_tokens": cfg.engine_max_new_tokens, "ignore_eos": True}
                    for name in names[n % len(names):] + names[: n % len(names)]:
                        r = gpool.timed(name, eprompts[i]["ids"], params)
                        r.update({"temperature": t, "prompt_index": i})
                        rows[name].append(r)
                        bar.update(1)
            for name in group:
                spec = specs[name]
                e: dict[str, Any] = {"loss": spec["loss"], "mode": spec["mode"], "k": spec["k"], "group": gi}
                if name in rows and rows.get("none"):
                    e.update({"timed": rows[name], "baseline_timed": rows["none"],
                              "startup_seconds": gpool.startup_seconds.get(name)})
                else:
                    err = gpool.errors.get(name) or f"no-speculation engine failed: {gpool.errors.get('none')}"
                    e["error"] = err[-3000:]
                engines[name] = e
            if gi == 0:
                engines["none"] = {"timed": rows.get("none", []), "group": 0, "loss": None, "mode": None, "k": 0}
        finally:
            if own:
                gpool.close()
    bar.close()
    return engines


class Analyzer:
    """The target and the heads in PyTorch, loaded once; target hidden states of the held-out
    samples are kept on disk (``hidden_dir``, fp32) so the head-independent part runs once.
    Heads with aux layers (EAGLE-3-style) also read the residual stream after some target
    layers: those of the union of the heads' aux layer ids are kept per sequence too, in a file
    of their own (``<key>-<sha>-aux<ids>.pt``, a dict layer id -> [L, H]) next to the hidden
    states' (``<key>-<sha>.pt``, unchanged: caches written before aux heads still load)."""

    def __init__(self, cfg: StudyConfig, hidden_dir: Path | None = None) -> None:
        import torch
        from study.analytic import aux_layers_of

        from bebop_vllm.heads import load_heads
        from bebop_vllm.heads.target import load_target_model

        self.cfg = cfg
        self.hidden_dir = hidden_dir
        self.external: dict[str, Any] = {}  # token list (json) -> precomputed hidden states
        self.target = load_target_model(cfg.model_dir, torch.float32)
        self.heads = {name: load_heads(d, cfg.model_dir, dtype=torch.float32) for name, d in cfg.heads.items()}
        for h in self.heads.values():
            h.eval()
        self.aux_layer_ids = aux_layers_of(self.heads.values())

    def states(self, tokens: list[int], key: str | None) -> tuple[Any, dict[int, Any]]:
        """(post-norm hidden states [L, H], residual stream [L, H] by aux layer id) of ``tokens``:
        from ``external`` or the disk cache where there, else one target pass (cached under ``key``)."""
        import torch
        from study.analytic import target_hidden_and_aux

        disk = key if self.hidden_dir is not None else None  # the cache key, None: no disk cache
        h = self.external.get(json.dumps(tokens))
        if h is None and disk is not None and self._path(tokens, disk).is_file():
            h = torch.load(self._path(tokens, disk))
        aux: dict[int, Any] | None = {}
        if self.aux_layer_ids:
            aux_path = None if disk is None else self._aux_path(tokens, disk)
            aux = torch.load(aux_path) if aux_path is not None and aux_path.is_file() else None
        if h is not None and aux is not None:
            return h, aux
        new_h, aux = target_hidden_and_aux(self.target, tokens, self.aux_layer_ids)
        if disk is not None:
            self._save(tokens, disk, new_h, aux)
        return (new_h if h is None else h), aux

    def _path(self, tokens: list[int], key: str, suffix: str = "") -> Path:
        import hashlib

        assert self.hidden_dir is not None
        return self.hidden_dir / f"{key}-{hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]}{suffix}.pt"

    def _aux_path(self, tokens: list[int], key: str) -> Path:
        return self._path(tokens, key, "-aux" + "_".join(map(str, self.aux_layer_ids)))

    def _missing(self, tokens: list[int], key: str) -> bool:
        no_h = not self._path(tokens, key).is_file() and json.dumps(tokens) not in self.external
        return no_h or (bool(self.aux_layer_ids) and not self._aux_path(tokens, key).is_file())

    def _save(self, tokens: list[int], key: str, hidden: Any, aux: dict[int, Any]) -> None:
        """Write what the disk cache lacks: the hidden states (unless external) and the aux features."""
        import torch

        assert self.hidden_dir is not None
        self.hidden_dir.mkdir(parents=True, exist_ok=True)
        todo = []
        if not self._path(tokens, key).is_file() and json.dumps(tokens) not in self.external:
            todo.append((self._path(tokens, key), hidden))
        if self.aux_layer_ids and not self._aux_path(tokens, key).is_file():
            todo.append((self._aux_path(tokens, key), aux))
        for path, value in todo:
            torch.save(value, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)

    def prefill_shared(self, prompt: list[int], conts: list[tuple[str, list[int]]]) -> None:
        """Hidden states (and aux features) of several continuations of one prompt, running the
        prompt once (its KV cache is copied per continuation; equal to a full forward up to float
        rounding) and each distinct continuation once."""
        import copy

        import torch

        from bebop_vllm.heads.target import aux_streams

        todo = [(k, c) for k, c in conts if self._missing(prompt + c, k)]
        if not todo or self.hidden_dir is None:
            return
        ids = self.aux_layer_ids

        def states(out: Any) -> tuple[Any, dict[int, Any]]:
            return out.last_hidden_state[0].float(), {i: s[0].float() for i, s in zip(ids, aux_streams(out, ids),
                                                                                       strict=True)}

        done: dict[str, tuple[Any, dict[int, Any]]] = {}
        with torch.no_grad():
            out = self.target.model(input_ids=torch.tensor([prompt]), use_cache=True, output_hidden_states=bool(ids))
            for key, cont in todo:
                if json.dumps(cont) not in done:
                    h, aux = states(out)
                    if cont:
                        rest = states(self.target.model(
                            input_ids=torch.tensor([cont]), past_key_values=copy.deepcopy(out.past_key_values),
                            use_cache=True, output_hidden_states=bool(ids)))
                        h, aux = torch.cat([h, rest[0]]), {i: torch.cat([aux[i], rest[1][i]]) for i in ids}
                    done[json.dumps(cont)] = h, aux
                self._save(prompt + cont, key, *done[json.dumps(cont)])

    def run(self, tokens: list[int], prompt_len: int, temperature: float, heads: list[str],
            key: str | None = None) -> dict[str, Any]:
        from study.analytic import SequenceInput, sequence_stats

        seq = SequenceInput(tokens=tokens, prompt_len=prompt_len, temperature=temperature)
        hidden, aux = self.states(tokens, key)
        return sequence_stats(self.target, {h: self.heads[h] for h in heads}, seq, self.cfg.num_depths,
                              hidden=hidden, aux=aux)


def stage_hidden(prompts: list[dict[str, Any]], samples: list[dict[str, Any]], analyzer: Analyzer) -> None:
    """Precompute the target hidden states of every held-out sample (head-independent), running
    each prompt once for all its temperatures."""
    from tqdm import tqdm

    by_prompt: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_index"], []).append(s)
    for i, group in tqdm(by_prompt.items(), desc="target hidden states", unit="prompt", dynamic_ncols=True):
        analyzer.prefill_shared(
            prompts[i]["ids"], [(f"{s['prompt_index']}@{s['temperature']:g}", s["tokens"]) for s in group]
        )


def stage_analytic(cfg: StudyConfig, prompts: list[dict[str, Any]], samples: list[dict[str, Any]],
                   analyzer_fn: Any, partial: Path, deadline: float | None = None,
                   status: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Teacher-forced statistics per request; resumable per sequence through ``partial`` (jsonl).
    Past ``deadline`` (time.time()) it stops and reports in ``status`` how far it got."""
    from tqdm import tqdm

    done: dict[str, list[dict[str, Any]]] = {}
    if partial.is_file():
        for line in partial.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = row["records"]
    records: list[dict[str, Any]] = []
    todo = [s for s in samples if f"{s['prompt_index']}@{s['temperature']:g}" not in done]
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="analytic (teacher-forced)",
               unit="seq", dynamic_ncols=True)
    with partial.open("a") as f:
        for s in samples:
            key = f"{s['prompt_index']}@{s['temperature']:g}"
            if key not in done and deadline is not None and time.time() > deadline:
                continue
            if key not in done:
                p = prompts[s["prompt_index"]]
                t = s["temperature"]
                compare = any(abs(t - c) < 1e-9 for c in cfg.compare_temperatures)
                heads = [cfg.primary] + [h for h in cfg.heads if h != cfg.primary and compare]
                stats = analyzer_fn().run(p["ids"] + s["tokens"], len(p["ids"]), t, heads, key=key)
                recs = [
                    {"domain": p["domain"], "prompt_id": p["prompt_id"], "temperature": t, "head": h,
                     "new_tokens": len(s["tokens"]), "stats": st}
                    for h, st in stats.items()
                ]
                f.write(json.dumps({"key": key, "records": recs}) + "\n")
                f.flush()
                done[key] = recs
                bar.update(1)
            records.extend(done[key])
    bar.close()
    if status is not None:
        status["done"] = sum(1 for s in samples if f"{s['prompt_index']}@{s['temperature']:g}" in done)
        status["total"] = len(samples)
    return records


def stage_crosscheck(cfg: StudyConfig, prompts: list[dict[str, Any]], engines: dict[str, Any],
                     analyzer_fn: Any) -> dict[str, Any]:
    """Teacher-forced prediction on the exact tokens each bebop engine generated, next to what
    the engine measured for those requests."""
    from tqdm import tqdm

    eprompts = engine_prompts(cfg, prompts)
    out: dict[str, Any] = {}
    items = [(name, r) for name, r in engines.items() if "error" not in r and name != "none"]
    total = sum(len(r["timed"]) for _, r in items)
    with tqdm(total=total, desc="cross-check (teacher-forced on engine tokens)", unit="req", dynamic_ncols=True) as bar:
        for name, r in items:
            loss, mode = r["loss"], r["mode"]
            rows = []
            for row in r["timed"]:
                p = eprompts[row["prompt_index"]]
                st = analyzer_fn().run(p["ids"] + row["tokens"], len(p["ids"]), row["temperature"], [loss]).get(loss)
                spec = row.get("spec") or {}
                rows.append({
                    "domain": p["domain"], "prompt_id": p["prompt_id"], "temperature": row["temperature"],
                    "k": r["k"],
                    "analytic_tau": st[mode]["tau_by_k"][r["k"] - 1] if st else None,
                    "analytic_tau_by_k": st[mode]["tau_by_k"] if st else None,
                    "analytic_acceptance": st[mode]["acceptance"] if st else None,
                    "entropy_teacher_forced": st["entropy"] if st else None,
                    "measured_tau": spec.get("mean_acceptance_length"),
                    "measured_acceptance": spec.get("draft_acceptance_rate"),
                    "engine_entropy": _engine_entropy(spec),
                })
                bar.update(1)
            out[name] = rows
    return out


def _engine_entropy(spec: dict[str, Any]) -> float | None:
    """The target entropy the metrics colleague's plugin reports per request (field name probed)."""
    names = ("mean_target_entropy", "target_entropy_mean", "mean_entropy", "entropy_mean", "target_entropy", "entropy")
    for k in names:
        v = spec.get(k)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
        if isinstance(v, dict) and isinstance(v.get("mean"), (int, float)):
            return float(v["mean"])
    return None


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        from study.report import write_markdown

        study_json = args.out / "study.json"
        if not study_json.is_file():
            print(f"error: {study_json} not found: run the study first", file=sys.stderr)
            return 2
        write_markdown(json.loads(study_json.read_text()), args.out / "study.md")
        print(f"wrote {args.out / 'study.md'} from {study_json}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from study.common import machine_info
    from study.summarize import summarize

    from bebop_vllm.errors import BebopError

    if args.threads:
        torch.set_num_threads(args.threads)
    elif hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        torch.set_num_threads(1)  # an oversubscribed machine: OpenMP barriers across busy cores crawl
    t_start = time.time()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        cfg = build_config(args)
    except BebopError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.engine and not torch.cuda.is_available():  # CPU engines: KV cache and weights in host memory
        from study.common import engine_memory_warning, free_memory_gib

        try:
            kv_gib = float(os.environ["VLLM_CPU_KVCACHE_SPACE"])
        except ValueError:
            kv_gib = 0.0  # vLLM reports a malformed value itself
        warning = engine_memory_warning(kv_gib, cfg.engines_at_once, free_memory_gib())
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = StageCache(out)
    print(f"heads: {cfg.heads} (primary {cfg.primary}); missing losses: "
          f"{[x for x in LOSS_ORDER if x not in cfg.heads]}")

    # what the prompts and the sampled continuations depend on (not the heads, not the engine runs)
    data_key = cfg.key("model_dir", "domains", "prompts_per_domain", "max_prompt_tokens", "max_new_tokens",
                       "temperatures", "seed", "dtype")
    external_hidden: dict[str, Any] = {}
    if cfg.source == "heads-heldout":
        prompts, samples, external_hidden = heads_heldout(cfg)
        data_key = cfg.key("model_dir", "domains", "temperatures", "source")
        print(f"[samples] heads' held-out set: {len(prompts)} sequences (sampled at T=1), "
              f"{len(external_hidden)} with cached hidden states")
    else:
        prompts = cache.run("prompts", data_key, lambda: select_study_prompts(cfg))
        samples = cache.get("samples", data_key)
    specs = engine_specs(cfg, cfg.engine)
    timed_key = cfg.key()
    engines = cache.get("timed", timed_key) if cfg.engine else {}
    if samples is None or engines is None:
        from study.engine import EnginePool

        log_dir = cache.dir / "engine-logs"
        if args.only_samples:
            engines = {}
        first = [n for n in specs if n != "none"][: cfg.engines_at_once - 1] if engines is None else []
        pool = EnginePool({n: specs[n] for n in ["none", *first]}, log_dir)
        try:
            if samples is None:
                samples = cache.run("samples", data_key, lambda: stage_sample(cfg, prompts, pool))
            if engines is None:
                if args.fail_fast and pool.errors:
                    raise RuntimeError(f"engines failed to start: {pool.errors}")
                engines = cache.run("timed", timed_key, lambda: stage_timed(cfg, prompts, specs, log_dir, pool))
                if any("error" in e for e in engines.values()):
                    cache.path("timed").unlink()  # a rerun retries the engines that failed
        finally:
            pool.close()
    else:
        print("[samples] cached\n[timed] cached")

    if cfg.analytic_prompts_per_domain is not None:
        keep: set[int] = set()
        for d in cfg.domains:
            idx = [i for i, p in enumerate(prompts) if p["domain"] == d]
            keep |= set(idx[: cfg.analytic_prompts_per_domain])
        samples = [s for s in samples if s["prompt_index"] in keep]
    hidden_dir = cache.dir / f"hidden-{data_key}"
    analyzer: list[Analyzer] = []

    def get_analyzer() -> Analyzer:
        if not analyzer:
            analyzer.append(Analyzer(cfg, hidden_dir))
            analyzer[0].external = external_hidden
        return analyzer[0]

    if args.only_samples:
        stage_hidden(prompts, samples, get_analyzer())
        print(f"[samples] {len(samples)} continuations and their target hidden states ready in {cache.dir}")
        return 0

    # the analytic part does not depend on the engine runs: adding them later reuses it
    analytic_key = cfg.key("model_dir", "heads", "primary", "domains", "prompts_per_domain", "max_prompt_tokens",
                           "max_new_tokens", "temperatures", "compare_temperatures", "num_depths", "seed",
                           "analytic_prompts_per_domain", "source")
    if cache.get("analytic", analytic_key) is None:
        stage_hidden(prompts, samples, get_analyzer())
    deadline = t_start + 60 * args.analytic_budget_min if args.analytic_budget_min else None
    status: dict[str, Any] = {}
    records = cache.run(
        "analytic", analytic_key,
        lambda: stage_analytic(cfg, prompts, samples, get_analyzer, cache.dir / f"analytic-{analytic_key}.jsonl",
                               deadline, status),
    )
    if status and status["done"] < status["total"]:
        cache.path("analytic").unlink()  # incomplete: a rerun continues from the per-sequence log
        print(f"[analytic] budget reached: {status['done']} of {status['total']} sequences (rerun to continue)")
    crosscheck: dict[str, Any] = {}
    if cfg.engine:
        crosscheck = cache.run(
            "crosscheck", result_key(timed_key, engines),
            lambda: stage_crosscheck(cfg, prompts, engines, get_analyzer),
        )

    stage_seconds = {n: cache.seconds(n) for n in ["prompts", "samples", "timed", "analytic", "crosscheck"]}
    command = "python benchmarks/acceptance_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = summarize(
        cfg, prompts, records, engines, crosscheck,
        meta={
            "command": command.strip(),
            "started": started,
            "wall_seconds_this_invocation": round(time.time() - t_start, 1),
            "stage_seconds": stage_seconds,
            "machine": machine_info(),
            "head_metadata": {k: head_metadata(v) for k, v in cfg.heads.items()},
            "missing_losses": [x for x in LOSS_ORDER if x not in cfg.heads],
            "analytic_sequences_done": status.get("done"),
            "analytic_sequences_total": status.get("total"),
        },
        out_dir=out,
    )
    print(f"wrote {out / 'study.json'}, {out / 'study.md'} and {len(summary['figures'])} figures "
          f"in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
