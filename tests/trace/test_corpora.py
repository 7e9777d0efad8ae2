"""trace/corpora.py: every domain has real text here, the held-out split partitions it, bad names fail."""

import pytest

from hotexperts.errors import HotExpertsError
from hotexperts.trace.corpora import DOMAINS, corpus, domain_text, split_blocks


@pytest.mark.parametrize("name", DOMAINS)
def test_every_domain_has_text_and_is_deterministic(name):
    a = domain_text(name, 50_000)
    assert len(a) == 50_000 and a == domain_text(name, 50_000)


def test_domains_read_as_what_they_claim():
    assert b"def " in domain_text("code", 200_000)
    assert b"the " in domain_text("docs", 200_000)
    assert b"license" in domain_text("legal", 200_000).lower()


def test_split_blocks_holds_out_every_fifth_block_and_loses_nothing():
    data = bytes(range(256)) * 40                                   # 10240 bytes: blocks of 1000
    train, held = split_blocks(data, block=1000, every=5)
    assert held == data[4000:5000] + data[9000:10000]
    assert len(train) + len(held) == len(data)
    assert train.startswith(data[:4000]) and data[5000:9000] in train


def test_corpus_gives_train_and_heldout_per_domain():
    c = corpus(20_000, block=1000)
    assert set(c) == set(DOMAINS)
    assert all(len(h) == 4000 and len(t) == 16_000 for t, h in c.values())


def test_bad_input_is_a_clear_error():
    with pytest.raises(HotExpertsError, match="unknown text domain"):
        domain_text("poetry")
    with pytest.raises(HotExpertsError, match="every >= 2"):
        split_blocks(b"abc", every=1)
