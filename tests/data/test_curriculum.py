"""Curriculum loader: mix proportions, temperature, phases, budgets, determinism, resumption, sharding."""
import numpy as np
import pytest
from fairseq.data import FairseqDataset

from wavllm_fairseq.data.curriculum import (CurriculumBatchSampler, CurriculumEpochBatchIterator, Phase,
                                       curriculum_from_subsets, load_curriculum, make_batches, mix_of)
from wavllm_fairseq.errors import WavLLMInputError

RNG = np.random.default_rng(0)
COSTS = {"asr": RNG.integers(16000, 160000, 300), "st": RNG.integers(16000, 160000, 100),
         "it": RNG.integers(5000, 20000, 50)}
OFFSETS = {"asr": 0, "st": 300, "it": 400}


class Fake(FairseqDataset):
    sizes = np.concatenate(list(COSTS.values()))

    def __getitem__(self, i):
        return i

    def __len__(self):
        return len(self.sizes)

    def collater(self, samples):
        return list(samples)

    def num_tokens(self, i):
        return int(self.sizes[i])


def sampler(phases, **kw):
    args = dict(max_tokens=480000, max_sentences=16, seed=1, updates_per_epoch=400)
    args.update(kw)
    return CurriculumBatchSampler(COSTS, OFFSETS, phases, **args)


def test_mix_matches_the_weights():
    s = sampler([Phase(0, weights={"asr": 3, "st": 1, "it": 0})], updates_per_epoch=2000)
    mix = mix_of(s(None, 1), s)
    assert abs(mix["asr"] - 0.75) < 0.03 and abs(mix["st"] - 0.25) < 0.03 and mix["it"] == 0


def test_temperature_probabilities():
    p = Phase(0, temperature=2.0).probabilities(["a", "b"], [400, 100])
    np.testing.assert_allclose(p, [20 / 30, 10 / 30])
    assert np.allclose(Phase(0, temperature=1e9).probabilities(["a", "b"], [400, 100]), [0.5, 0.5], atol=1e-6)
    s = sampler([Phase(0, temperature=1.0)], updates_per_epoch=3000)
    mix = mix_of(s(None, 1), s)
    assert abs(mix["asr"] - 300 / 450) < 0.03 and abs(mix["it"] - 50 / 450) < 0.02


def test_phase_switches_the_mix_at_its_update():
    s = sampler([Phase(0, weights={"asr": 1}), Phase(150, weights={"it": 1})], updates_per_epoch=100, update_freq=2)
    e1, e2 = s(None, 1), s(None, 2)  # updates 0-99, 100-199 (2 batches per update)
    assert mix_of(e1, s)["asr"] == 1.0
    assert mix_of(e2[:100], s)["asr"] == 1.0 and mix_of(e2[100:], s)["it"] == 1.0


def test_same_seed_same_batches_other_seed_or_epoch_differs():
    a = sampler([Phase(0, weights={"asr": 1, "st": 1})])
    b = sampler([Phase(0, weights={"asr": 1, "st": 1})])
    c = sampler([Phase(0, weights={"asr": 1, "st": 1})], seed=2)
    same = lambda x, y: len(x) == len(y) and all(np.array_equal(i, j) for i, j in zip(x, y))  # noqa: E731
    assert same(a(None, 1), b(None, 1))
    assert not same(a(None, 1), c(None, 1)) and not same(a(None, 1), a(None, 2))


def test_padded_budget_and_max_sentences_and_oversize_items():
    costs = np.array([100, 90, 80, 1000, 10, 20, 30, 40])
    batches = make_batches(np.argsort(costs, kind="stable"), costs, max_tokens=200, max_sentences=3)
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * costs[b].max() <= 200)
    assert [3] in [b.tolist() for b in batches]  # an item over budget forms its own batch
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    s = sampler([Phase(0, weights={"asr": 1, "st": 1, "it": 1})], max_tokens=300000, max_sentences=5)
    for b in s(None, 1):
        all_costs = np.concatenate(list(COSTS.values()))[b]
        assert len(b) <= 5 and (len(b) == 1 or len(b) * all_costs.max() <= 300000)


def make_itr(s, shard_id=0, num_shards=1):
    return CurriculumEpochBatchIterator(dataset=Fake(), collate_fn=Fake().collater, batch_sampler=s, seed=1,
                                        num_shards=num_shards, shard_id=shard_id, epoch=1)


def test_resume_mid_epoch_continues_the_same_order():
    s = sampler([Phase(0, weights={"asr": 2, "st": 1, "it": 1})], updates_per_epoch=30)
    full = make_itr(s)
    order = []
    for epoch in range(2):
        itr = full.next_epoch_itr(shuffle=True)
        order += [list(b) for b in itr]
    assert order[:30] == [b.tolist() for b in s(None, 1)]  # fairseq keeps the curriculum's order
    # interrupted after 12 batches of epoch 1
    first = make_itr(s)
    itr = first.next_epoch_itr(shuffle=True)
    seen = [list(next(itr)) for _ in range(12)]
    state = first.state_dict()
    resumed = make_itr(s)
    resumed.load_state_dict(state)
    rest = []
    itr = resumed.next_epoch_itr(shuffle=True)
    rest += [list(b) for b in itr]
    itr = resumed.next_epoch_itr(shuffle=True)
    rest += [list(b) for b in itr]
    assert seen + rest == order


def test_shards_get_equal_numbers_of_batches():
    s = sampler([Phase(0, weights={"asr": 1, "st": 1})], updates_per_epoch=25, num_shards=2, update_freq=2)
    n = [len(list(make_itr(s, k, 2).next_epoch_itr(shuffle=True))) for k in range(2)]
    assert n == [50, 50]


def test_yaml_loading_and_errors(tmp_path):
    good = tmp_path / "cur.yaml"
    good.write_text("corpora: {asr: train_asr, st: train_st.tsv}\nphases:\n  - {start_update: 0, weights: {asr: 3}}\n"
                    "  - {start_update: 500, temperature: 2.0}\n")
    cfg = load_curriculum(str(good))
    assert cfg.corpora == {"asr": "train_asr", "st": "train_st.tsv"} and cfg.phases[1].temperature == 2.0
    cases = {
        "corpora: {asr: a}\nphases:\n  - {start_update: 0, weights: {mt: 1}}\n": "unknown corpora",
        "corpora: {asr: a}\nphases:\n  - {start_update: 0, weights: {asr: -1}}\n": "weights must be",
        "corpora: {asr: a}\nphases:\n  - {start_update: 5, weights: {asr: 1}}\n": "start at update 0",
        "corpora: {asr: a}\nphases:\n  - {start_update: 0, weights: {asr: 1}}\n  - {start_update: 0, temperature: 1}\n":
            "increase strictly",
        "phases: []\n": "corpora",
    }
    for i, (text, msg) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.yaml"
        bad.write_text(text)
        with pytest.raises(WavLLMInputError, match=msg) as e:
            load_curriculum(str(bad))
        assert str(bad) in str(e.value)


def test_from_subsets():
    cfg = curriculum_from_subsets("train_asr,train_it", "3,1")
    assert list(cfg.corpora) == ["train_asr", "train_it"] and cfg.phases[0].weights == {"train_asr": 3, "train_it": 1}
    assert curriculum_from_subsets("train_asr", "", 2.0).phases[0].temperature == 2.0
    with pytest.raises(WavLLMInputError, match="3 values for 2"):
        curriculum_from_subsets("a,b", "1,2,3")
