"""`--terms` parsing: examples and properties (any input parses or gives the clean error)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elbokit.errors import ElbokitError
from elbokit.objective import PRESETS, parse_terms

NAMES = st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True).filter(lambda n: n not in PRESETS)
WEIGHTS = st.floats(allow_nan=False, allow_infinity=False, width=32)


def test_presets_expand():
    assert parse_terms("classic") == [("recon", 1.0), ("kl", 1.0)]
    assert [n for n, _ in parse_terms("ed")] == ["recon", "infonce", "entropy", "xent"]


def test_weights_and_spaces():
    assert parse_terms(" recon , kl:0.5,infonce:-1 ") == [("recon", 1.0), ("kl", 0.5), ("infonce", -1.0)]


@pytest.mark.parametrize("spec, fragment", [
    ("", "empty"),
    (",", "empty"),
    ("recon,,kl", "Cannot read term ''"),
    ("recon,kl:abc", "must be a number"),
    ("recon,kl:inf", "must be finite"),
    ("recon,kl:nan", "must be finite"),
    ("recon,recon", "appears twice"),
    ("recon,classic", "cannot be mixed"),
    ("Recon", "Cannot read term 'Recon'"),
    ("recon;kl", "Cannot read term 'recon;kl'"),
    ("kl:1:2", "Cannot read term 'kl:1:2'"),
    ("recon,kl,recon", "appears twice"),
    ("recon:1,recon:2", "appears twice"),
    ("recon,ed", "cannot be mixed"),
    ("kl:half", "must be a number"),
    ("kl:-inf", "must be finite"),
    ("recon kl", "Cannot read term 'recon kl'"),
    ("kl:", "Cannot read term 'kl:'"),
    ("   ", "empty"),
])
def test_bad_specs_give_one_sentence(spec, fragment):
    with pytest.raises(ElbokitError) as info:
        parse_terms(spec)
    message = str(info.value)
    assert fragment in message and "\n" not in message


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_text_parses_or_gives_the_clean_error(text):
    try:
        parsed = parse_terms(text)
    except ElbokitError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    names = [n for n, _ in parsed]
    assert names and len(set(names)) == len(names)
    assert all(math.isfinite(w) for _, w in parsed)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(NAMES, st.one_of(st.none(), WEIGHTS)), min_size=1, max_size=6,
                unique_by=lambda t: t[0]))
def test_written_specs_round_trip(items):
    spec = ",".join(name if w is None else f"{name}:{w!r}" for name, w in items)
    expected = [(name, 1.0 if w is None else float(repr(w))) for name, w in items]
    assert parse_terms(spec) == expected
