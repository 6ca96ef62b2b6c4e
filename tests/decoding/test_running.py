"""Rows joining a running batch between steps (running.py, continuous batching) on wavllm_tiny on the CPU:
every row, whenever it joins and whichever rows it shares the batch with, decodes the tokens and scores it
decodes alone, on the dynamic path and on the static path (its step run eagerly, as a GPU's graph would
run it), stage 1 and stage 2 (per-row LoRA scale), streamed through ``on_step``; the joined cache is
left-padded with the padding that finished rows left behind dropped."""
import pytest
import torch

from wavllm_fairseq.decoding.kv_cache import join_left_padded
from wavllm_fairseq.decoding.running import RunningBatch

from test_generator import gen, model_with_lora, row, tokens
from test_static_decode import CAPS, mixed

# before step t, these rows of mixed() join (caps: rows 0 and 4 end after 3 tokens, 1 after 5, 2 and 5
# after 9, 3 after 14): joins into a running batch, rows leaving between joins, a join into an empty batch
SCHEDULE = {0: [0, 1], 2: [2], 4: [3, 4], 7: [5]}
EMPTY_GAP = {0: [0], 5: [4, 1], 6: [2]}


def rows_of(sample, rows):
    """The rows of a batch as their own batch, padded to their own lengths only."""
    n = sample["net_input"]
    idx = torch.tensor(rows)
    lengths = {k: n[k][idx] for k in ("audio_lengths", "pre_lengths", "post_lengths", "instruction_lengths")}
    net = dict(audio=n["audio"][idx, : max(int(lengths["audio_lengths"].max()), 1)],
               pre_tokens=n["pre_tokens"][idx, : int(lengths["pre_lengths"].max())],
               post_tokens=n["post_tokens"][idx, : int(lengths["post_lengths"].max())],
               instruction_tokens=n["instruction_tokens"][idx, : int(lengths["instruction_lengths"].max())],
               **lengths)
    return {"id": sample["id"][idx], "net_input": net, "nsentences": len(rows),
            "task_names": [sample["task_names"][b] for b in rows]}


def decode_with_joins(g, sample, schedule):
    """Run one RunningBatch over ``schedule``; returns ({row: hypothesis}, {row: streamed tokens}, masks seen)."""
    run, done, streamed, masks = RunningBatch(g), {}, {}, []
    pending, t = dict(schedule), 0

    def on_step(keys, toks):
        for k, tok in zip(keys, toks):
            streamed.setdefault(k, []).append(tok)

    while run or pending:
        if t in pending:
            rows = pending.pop(t)
            prefix, caps, cap_is_task = g.build_prefix(rows_of(sample, rows))
            run.join(prefix, caps, rows, cap_is_task=cap_is_task)
            if run.state.mask is not None:
                masks.append(run.state.mask.clone())
        if run:
            done.update(run.advance(on_step))
        t += 1
    return done, streamed, masks


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("schedule", [SCHEDULE, EMPTY_GAP], ids=["joins", "empty_gap"])
def test_rows_joining_mid_decode_answer_as_alone(stage, static, schedule):
    m, s = model_with_lora(stage), mixed()
    g = gen(m, static=static, cuda_graphs=False, max_len_b=20, max_len_per_task=CAPS)
    with torch.no_grad():
        done, streamed, masks = decode_with_joins(g, s, schedule)
    rows = sorted(b for rows in schedule.values() for b in rows)
    assert sorted(done) == rows
    for b in rows:
        one = {**row(s, b), "task_names": [s["task_names"][b]]}
        alone = gen(m, static=False, max_len_b=20, max_len_per_task=CAPS).generate([m], one)
        assert tokens([[done[b]]]) == tokens(alone), b
        torch.testing.assert_close(done[b]["positional_scores"], alone[0][0]["positional_scores"], atol=1e-4,
                                   rtol=1e-4)
        answer = done[b]["tokens"].tolist()
        assert streamed[b] == answer[: len(streamed[b])] and len(streamed[b]) >= len(answer) - 1
    for mask in masks:  # no column that every row masks: the padding finished rows left is dropped
        assert bool(mask.bool().any(0).all())


def test_rows_joining_a_static_batch_use_power_of_two_slots():
    m, s = model_with_lora(1), mixed()
    g = gen(m, static=True, cuda_graphs=False, max_len_b=20, max_len_per_task=CAPS)
    run = RunningBatch(g)
    with torch.no_grad():
        prefix, caps, cap_is_task = g.build_prefix(rows_of(s, [0, 1]))
        run.join(prefix, caps, [0, 1], cap_is_task=cap_is_task)
        run.advance()
        prefix, caps, cap_is_task = g.build_prefix(rows_of(s, [2]))
        run.join(prefix, caps, [2], cap_is_task=cap_is_task)
    assert run.state.static.slots == 4 and run.keys == [0, 1, 2]
    with pytest.raises(ValueError, match="unique"):
        run.join(prefix, caps, [2])


def test_join_left_padded_right_aligns_rows_and_drops_shared_padding():
    def part(rows):
        mask = torch.tensor(rows)
        n, width = mask.shape
        keys = torch.arange(n * width, dtype=torch.float32).view(n, 1, width, 1) + 1
        return [(keys, -keys)], mask

    # part a: 2 rows, 5 columns, the first two masked by both rows (their padding partner left)
    a = part([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    b = part([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    cache, mask = join_left_padded([a, b])
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    k = cache.layers[0].keys
    assert k.shape == (4, 1, 6, 1) and cache.get_seq_length() == 6
    assert k[0, 0, 3:, 0].tolist() == a[0][0][0][0, 0, 2:, 0].tolist()  # row 0's last 3 columns, right-aligned
    assert k[3, 0, :, 0].tolist() == b[0][0][0][1, 0, :, 0].tolist()
    assert torch.equal(cache.layers[0].values, -k)
