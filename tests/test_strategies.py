"""The strategy table's default draft lengths (strategies.draft_length): what a run without --k uses, the same for
a method and its peer in another engine (their comparison stays fair)."""

from __future__ import annotations

from specdec.strategies import STRATEGIES, draft_length


def test_a_run_without_k_takes_the_strategys_measured_default_and_a_given_k_wins():
    assert [draft_length(name, None) for name in ("dynamic-tree", "ngram", "suffix", "recycling")] == [8] * 4
    assert draft_length("speculative", None) == 4  # a draft model's best k depends on the pair
    assert draft_length("dynamic-tree", 3) == 3 and draft_length("speculative", 6) == 6


def test_every_peer_defaults_to_the_same_draft_length():
    for st in STRATEGIES.values():
        peer = STRATEGIES.get(st.peer) if st.peer else None
        if peer is not None and st.uses_k and peer.uses_k:
            assert st.k == peer.k, (st.name, peer.name)
