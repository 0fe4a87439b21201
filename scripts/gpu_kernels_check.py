"""Triton kernels compiled for CUDA (not the interpreter) == the torch path, at V = 49,152 and 151,936.

Run by scripts/gpu_check.sh; writes one JSON report. Outputs are compared bit for bit (same
uniforms, see tests/test_kernels_triton.py for why that is expected); entropies within 5e-5.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def main(out_path: str) -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    assert os.environ.get("TRITON_INTERPRET") != "1", "TRITON_INTERPRET=1 would run the interpreter, not CUDA"
    import triton
    from bebop_vllm.kernels import draw_uniforms, rejection_sample, rejection_sample_from_logits

    assert not triton.knobs.runtime.interpret, "Triton runs in interpreter mode"
    dev = torch.device("cuda")
    cases, failures = [], 0
    for vocab in (49_152, 151_936):
        for ks in ([3, 0, 2, 1], [1] * 64, [3] * 64, [5, 4, 0, 3]):
            for kind in ("probs-probabilistic", "probs-one-hot", "logits-f32", "logits-bf16-topk-topp"):
                gen = torch.Generator(device=dev).manual_seed(vocab + len(ks) + sum(ks))
                rows, drafts, batch = sum(ks) + len(ks), sum(ks), len(ks)
                logits = torch.randn(rows, vocab, generator=gen, device=dev) * 3.0
                p = logits.softmax(-1)
                q = torch.softmax(torch.randn(drafts, vocab, generator=gen, device=dev) * 3.0, dim=-1)
                q[: drafts // 2] = 0.5 * q[: drafts // 2] + 0.5 * p[: drafts // 2]
                x = torch.multinomial(q, 1, generator=gen).squeeze(1)
                u = draw_uniforms(drafts, batch, dev, gen)
                t0 = time.perf_counter()
                case = {"vocab": vocab, "ks": ks if len(ks) < 8 else f"{len(ks)} x {ks[0]}", "kind": kind}
                try:
                    if kind.startswith("probs"):
                        dq = None if kind.endswith("one-hot") else q
                        a = rejection_sample(p, x, ks, dq, uniforms=u, backend="triton")
                        b = rejection_sample(p, x, ks, dq, uniforms=u, backend="torch")
                        ok = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                    else:
                        lg = logits.to(torch.bfloat16) if "bf16" in kind else logits
                        temperature = torch.linspace(0.5, 1.5, batch, device=dev)
                        temperature[0] = 0.0  # a greedy request
                        kw = {}
                        if "topk" in kind:
                            kw = {"top_k": torch.randint(5, vocab, (batch,), generator=gen, device=dev),
                                  "top_p": torch.rand(batch, generator=gen, device=dev) * 0.5 + 0.5}
                        a, b = (rejection_sample_from_logits(lg, x, ks, temperature, q, uniforms=u, return_entropy=True,
                                                             backend=be, **kw) for be in ("triton", "torch"))
                        ok = (torch.equal(a.output_token_ids, b.output_token_ids)
                              and torch.equal(a.num_accepted, b.num_accepted)
                              and torch.allclose(a.entropy, b.entropy, atol=5e-5, rtol=1e-5))
                    torch.cuda.synchronize()
                    case["ok"] = bool(ok)
                except Exception as exc:  # report every case, do not stop at the first
                    case["ok"], case["error"] = False, f"{type(exc).__name__}: {exc}"
                case["seconds"] = round(time.perf_counter() - t0, 3)
                failures += not case["ok"]
                cases.append(case)
                print(json.dumps(case), flush=True)
    report = {"device": torch.cuda.get_device_name(0), "triton": triton.__version__, "torch": torch.__version__,
              "interpreter": False, "cases": cases, "failures": failures}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{len(cases) - failures}/{len(cases)} kernel cases match the torch path")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
