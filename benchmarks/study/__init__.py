"""Helpers of ``benchmarks/acceptance_study.py`` (docs/study.md): one module per stage of the study.

- :mod:`study.common`    config, stage cache, head discovery, small utilities
- :mod:`study.engine`    vLLM runs in subprocesses: sampling held-out continuations, timed generation
- :mod:`study.analytic`  teacher-forced acceptance of the heads in PyTorch (greedy and probabilistic)
- :mod:`study.fits`      linear fits, gaps, gains, the entropy -> accepted-length predictor
- :mod:`study.plots`     the PNG figures
- :mod:`study.report`    the markdown report
"""
