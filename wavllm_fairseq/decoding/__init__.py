"""Decoding: the fairseq-generate generator (greedy, sampling, beam) built from its options (options.py), with
its per-call state (state.py), the beam bookkeeping (beam.py), the logit processors and sampling (processing.py),
and its dynamic and static key/value caches (kv_cache.py, static_decode.py)."""
