"""Decoding: the fairseq-generate generator (greedy, sampling, beam) and its dynamic and static key/value caches."""
