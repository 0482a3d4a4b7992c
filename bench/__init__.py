"""securechat's benchmark suite (issue 7): ``python -m bench`` or ``bench/run.sh``.

Measures the securechat relay, Redis pub/sub and a naive thread-per-client
relay side by side on the same workloads; see ``docs/performance.md``.
"""
