import pytest

from mllm_msr.data.protocol import EvalCase, ProtocolConfig, Splits, TrainExample, build_splits, k_core, split_users
from mllm_msr.data.schema import Dataset, Interaction, Item


def make_dataset(n_users=100, n_items=60, length=8, seed=0):
    import random
    rng = random.Random(seed)
    items = {f"i{k}": Item(f"i{k}", f"Title {k}") for k in range(n_items)}
    inter = []
    for u in range(n_users):
        seq = rng.sample(sorted(items), rng.randint(3, length))
        for t, i in enumerate(seq):
            inter.append(Interaction(f"u{u:03d}", float(1000 + 10 * t + u), i))
    return Dataset("toy", items, inter)


@pytest.fixture(scope="module")
def ds():
    return make_dataset()


def test_split_sizes_and_disjoint_users(ds):
    sp = build_splits(ds)
    assert isinstance(sp, Splits)
    assert (len(sp.train_users), len(sp.valid_users), len(sp.test_users)) == (80, 10, 10)
    tr, va, te = set(sp.train_users), set(sp.valid_users), set(sp.test_users)
    assert not (tr & va or tr & te or va & te) and len(tr | va | te) == 100
    assert {e.user_id for e in sp.train} == tr
    assert {c.user_id for c in sp.valid} == va and {c.user_id for c in sp.test} == te


def test_targets_histories_and_negatives(ds):
    sp = build_splits(ds)
    seqs = {u: [i.item_id for i in s] for u, s in ds.sequences().items()}
    touched = {u: set(s) for u, s in seqs.items()}
    for c in sp.test:
        assert isinstance(c, EvalCase)
        assert len(c.candidates) == 21 and sum(c.labels) == 1 and len(set(c.candidates)) == 21
        assert c.target == seqs[c.user_id][-1]
        assert list(c.history) == seqs[c.user_id][:-1][-20:]
        assert len(c.history_timestamps) == len(c.history)
        assert list(c.history_timestamps) == sorted(c.history_timestamps)
        negs = [x for x, lab in zip(c.candidates, c.labels, strict=True) if lab == 0]
        assert not set(negs) & touched[c.user_id]
    assert len({c.labels.index(1) for c in sp.test}) > 1  # positive position is shuffled
    for c in sp.valid:
        assert len(c.candidates) == 21 and sum(c.labels) == 1  # validation uses the test protocol
        assert not {x for x, lab in zip(c.candidates, c.labels, strict=True) if lab == 0} & touched[c.user_id]
    pos = [e for e in sp.train if e.label == 1]
    neg = [e for e in sp.train if e.label == 0]
    assert len(pos) == len(neg) == 80  # 1:1, one target per user (paper)
    for e in sp.train:
        assert isinstance(e, TrainExample)
        if e.label == 0:
            assert e.item_id not in touched[e.user_id]
        else:
            assert e.item_id == seqs[e.user_id][-1]


def test_deterministic_and_seeded(ds):
    a, b = build_splits(ds), build_splits(ds)
    assert a == b
    c = build_splits(ds, ProtocolConfig(seed=1))
    assert c.test_users != a.test_users
    # independent of interaction order
    shuffled = Dataset("toy", ds.items, list(reversed(ds.interactions)))
    assert build_splits(shuffled) == a


def test_history_cap_and_more_negatives(ds):
    sp = build_splits(ds, ProtocolConfig(max_history=2, test_negatives=5, train_negatives=3))
    assert all(len(c.history) <= 2 for c in sp.test + sp.valid)
    assert all(len(c.candidates) == 6 for c in sp.test)
    assert sum(e.label == 0 for e in sp.train) == 3 * sum(e.label == 1 for e in sp.train)


def test_train_targets_per_user(ds):
    sp = build_splits(ds, ProtocolConfig(train_targets_per_user=3))
    seqs = {u: [i.item_id for i in s] for u, s in ds.sequences().items()}
    for u in sp.train_users:
        got = [(e.history, e.item_id) for e in sp.train if e.user_id == u and e.label == 1]
        want = [(tuple(seqs[u][:t]), seqs[u][t]) for t in range(max(1, len(seqs[u]) - 3), len(seqs[u]))]
        assert got == want


def test_leave_one_out(ds):
    sp = build_splits(ds, ProtocolConfig(split="leave_one_out"))
    seqs = {u: [i.item_id for i in s] for u, s in ds.sequences().items()}
    users = [u for u in seqs if len(seqs[u]) >= 3]
    assert len(sp.test) == len(sp.valid) == len(users) == len(sp.test_users)
    for c in sp.test:
        assert c.target == seqs[c.user_id][-1] and list(c.history) == seqs[c.user_id][:-1]
    for c in sp.valid:
        assert c.target == seqs[c.user_id][-2] and list(c.history) == seqs[c.user_id][:-2]
    for e in sp.train:
        if e.label == 1:
            assert e.item_id == seqs[e.user_id][-3]
    assert sp.train_sequences == {u: tuple(seqs[u][:-2]) for u in users}


def test_user_split_train_sequences_are_whole_training_sequences(ds):
    sp = build_splits(ds, ProtocolConfig(max_history=2))
    seqs = {u: tuple(i.item_id for i in s) for u, s in ds.sequences().items()}
    assert sp.train_sequences == {u: seqs[u] for u in sp.train_users}  # not capped by max_history
    assert max(map(len, sp.train_sequences.values())) > 3


@pytest.mark.parametrize("file_order", [("z", "a"), ("a", "z")])
def test_same_timestamp_ties_keep_file_order(file_order):
    """Two interactions in the same second: the one later in the input is later in time, whatever
    the item ids (RecBole's stable sort does the same)."""
    items = {k: Item(k, k) for k in ("p", "q", "a", "z", "m")}
    first, second = file_order
    inter = [Interaction("u1", 1.0, "p"), Interaction("u1", 2.0, "q"),
             Interaction("u1", 5.0, first), Interaction("u1", 5.0, second),
             Interaction("u0", 3.0, "m"), Interaction("u0", 4.0, "p"), Interaction("u0", 4.0, "q")]
    ds = Dataset("ties", items, inter)
    sp = build_splits(ds, ProtocolConfig(split="leave_one_out", test_negatives=1))
    case = next(c for c in sp.test if c.user_id == "u1")
    assert case.target == second and case.history == ("p", "q", first)
    assert next(c for c in sp.valid if c.user_id == "u1").target == first
    assert next(c for c in sp.test if c.user_id == "u0").target == "q"
    assert [i.item_id for i in ds.sequences()["u1"]] == ["p", "q", first, second]


def test_cold_items_and_k_core():
    items = {k: Item(k, k) for k in "abcdefgh"}
    inter = [Interaction(u, float(t), i) for u, s in
             {"u1": "abc", "u2": "abd", "u3": "bcd", "u4": "abe"}.items() for t, i in enumerate(s)]
    ds = Dataset("t", items, inter)
    kept = k_core(ds.interactions, 2)
    assert {i.item_id for i in kept} == {"a", "b", "c", "d"}
    sp = build_splits(ds, ProtocolConfig(train_frac=0.5, valid_frac=0.25, test_negatives=3))
    train_items = {i.item_id for i in ds.interactions if i.user_id in sp.train_users}
    test_items = {x for c in sp.test for x in c.candidates}
    assert sp.cold_items == frozenset(test_items - train_items)
    sp2 = build_splits(ds, ProtocolConfig(k_core=2, train_frac=0.5, valid_frac=0.25, test_negatives=3))
    assert sp2.n_items == 4 and all(x in "abcd" for c in sp2.test for x in c.candidates)


def test_split_users_helper():
    tr, va, te = split_users([f"u{k}" for k in range(120)], seed=0)
    assert (len(tr), len(va), len(te)) == (96, 12, 12)
    assert split_users(list(reversed(tr + va + te)), seed=0) == (tr, va, te)


def test_short_users_dropped_and_few_negatives():
    items = {k: Item(k, k) for k in "abc"}
    inter = [Interaction("u1", 0.0, "a"), Interaction("u2", 0.0, "a"), Interaction("u2", 1.0, "b")]
    sp = build_splits(Dataset("t", items, inter), ProtocolConfig(train_frac=0.5, valid_frac=0.0))
    assert sp.dropped_users == 1
    assert sp.test
    for c in sp.test:  # only one untouched item exists: take what is available
        assert len(c.candidates) == 2
