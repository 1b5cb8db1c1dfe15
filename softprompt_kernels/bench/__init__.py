"""Benchmarks, inside the package so that ``softprompt-kernels bench`` works from a wheel.

Every suite follows one protocol. A benchmark module has

- ``BENCH``: the name its records carry; ``SUITES``: suite name -> :class:`harness.Suite`
  (device, cases, timing); ``CASE_KEY``: what the parts of a case's name mean (the plot's x axis);
- ``known_providers()``: the provider names ``--providers`` may pick from;
- either ``build(case, device, providers) -> harness.CaseSetup`` (inputs built once, one callable per
  provider, timed side by side by the harness), or ``measure(case, device, providers, timing) ->
  List[harness.Record]`` for what the harness cannot time as single calls (serving: whole generations,
  tokens/s and per-token latencies);
- optionally ``goals(records) -> List[str]``: the suite's performance goals (docs/DESIGN.md section 7), each
  reported as measured, met or not.

:mod:`.run` finds the suite, runs it, prints one line per case, the table last, and writes
``<out>/<suite>.json`` (records as in docs/DESIGN.md section 7) and ``<out>/<suite>.png``.
"""
