"""The zip schedule (onnxzip.schedule), plain data from the unit spaces: a chain ties each layer
as it is calibrated; a residual stream is paired once, at its last writer before its first reader,
and later writers follow that pairing."""

import builders as B
from onnxzip.canonical import import_network
from onnxzip.schedule import late_writers, schedule
from onnxzip.spaces import unit_spaces


def test_a_chain_ties_every_layer_at_once(tmp_path):
    net = import_network(B.save(B.cnn_model(B.cnn_weights(0)), tmp_path / "cnn.onnx"))
    steps = schedule(unit_spaces(net))
    assert [(s.layer, s.ties, s.pairs, s.stale, s.settled) for s in steps] == \
        [(k, (k,), True, False, True) for k in range(len(net.layers))]
    assert not late_writers(unit_spaces(net))


def test_a_residual_stream_is_paired_once_and_followed(tmp_path):
    net = import_network(B.save(B.resnet_model(B.resnet_weights(0)), tmp_path / "resnet.onnx"))
    spaces = unit_spaces(net)
    steps = schedule(spaces)
    assert late_writers(spaces)
    for s in spaces.spaces:
        writers = spaces.writers(s)
        decided = spaces.decided_at(s)
        pairing = [st for st in steps if st.space == s and st.pairs]
        assert len(pairing) == 1 and pairing[0].layer == decided
        assert pairing[0].ties == tuple(w for w in writers if w <= decided)
        for w in writers:
            if w > decided:  # a later writer follows the pairing, tied as soon as it is calibrated
                assert steps[w].ties == (w,) and not steps[w].pairs
    tied = sorted(w for st in steps for w in st.ties)
    assert tied == list(range(len(net.layers)))  # every layer tied exactly once
    for st in steps:
        assert st.stale == any(w < st.layer for w in st.ties)
        # settled (retraining may run) only when every space written so far has all its writers tied
        begun = [s for s in spaces.spaces if min(spaces.writers(s)) <= st.layer]
        assert st.settled == all(max(spaces.writers(s)) <= st.layer for s in begun), st
    assert steps[-1].settled and not all(st.settled for st in steps)
