"""Property: no override string makes the config loader or the CLI fail with a traceback.

Random ``section.key=value`` words (real and made-up sections and keys, values of every type,
YAML oddities, malformed words) either resolve to a valid config or end in a one-line
:class:`~nestlearn.errors.NestlearnError` (the CLI: status 2, or argparse's usage error).
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nestlearn.cli.main import main
from nestlearn.config import RunConfig, load_config
from nestlearn.config.schema import SECTIONS
from nestlearn.errors import NestlearnError
from nestlearn.models.registry import available_models, model_config_class

MODELS = available_models()
KEYS = {
    section: sorted({f.name for f in dataclasses.fields(cls)})
    for section, cls in SECTIONS.items()
    if section != "model"
}
KEYS["model"] = sorted(
    {f.name for name in MODELS for f in dataclasses.fields(model_config_class(name))}
)
NAMED = [None, None, None, "debug", "tiny", "hope-tiny", "gated_deltanet-tiny", "no-such-config"]

# Values as a user would type them: numbers of every size and sign, special floats, words,
# YAML collections, nulls, tags, broken YAML, and arbitrary text.
numbers = st.one_of(
    st.integers(-5, 70),
    st.integers(2**24 + 1, 10**30),
    st.integers(-(10**30), -5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1e-3", "1_000", "0x10", "-0", "1e999", ".inf", "-.inf", ".nan", "NaN"]),
).map(str)
words = st.one_of(
    st.sampled_from(MODELS),
    st.sampled_from(["true", "false", "yes", "no", "on", "null", "~", "", "auto", "cpu"]),
    st.sampled_from(["byte", "bpe", "fp32", "bf16", "cosine", "adamw", "muon", "cms", "chunk"]),
    st.text(max_size=12),
)
yaml_odd = st.sampled_from(
    [
        "[1, 2]",
        "[4, 0]",
        "[]",
        "[[1]]",
        "[0.5, -1]",
        "{a: 1}",
        "[1, 2",
        "{",
        "!!python/object:os.system 1",
        "!!binary aGk=",
        "2024-01-01",
        "&a 1",
        "*a",
        "'quoted'",
        '"\\ud800"',
        "a: b",
        "- 1",
        "|\n x",
        "%YAML 1.2",
        "\x00",
        "abc\udcff",
    ]
)
values = st.one_of(numbers, words, yaml_odd)
sections = st.one_of(st.sampled_from(sorted(SECTIONS)), st.text(max_size=6))


@st.composite
def known_override(draw) -> str:
    section = draw(st.sampled_from(sorted(KEYS)))
    key = draw(st.sampled_from(KEYS[section]))
    if section == "model" and key == "name":
        return f"model.name={draw(st.sampled_from([*MODELS, 'nope']))}"
    return f"{section}.{key}={draw(values)}"


def typed_value(hint) -> st.SearchStrategy[str]:
    """Values of the field's own type, in and out of range: these get past the type checks to
    the range checks and to building the model. Integers stay small or leave the int64 range
    (a valid model with 10**9 layers would only be slow to describe)."""
    if hint is bool:
        return st.sampled_from(["true", "false"])
    if hint is int:
        huge = st.one_of(st.integers(2**24 + 1, 2**70), st.integers(-(2**70), -(2**63)))
        return st.one_of(st.integers(-3, 70), huge).map(str)
    if hint is float:
        return st.one_of(
            st.floats(-2, 2), st.floats(-1e30, 1e30), st.sampled_from([0.0, 1e-30])
        ).map(repr)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return st.lists(typed_value(item), max_size=4).map(lambda xs: f"[{', '.join(xs)}]")
    return st.text(max_size=6)


@st.composite
def typed_overrides(draw) -> list[str]:
    """``model.name=<a model>`` and a few keys of that model (mostly) or of other sections, each
    with a value of its type."""
    name = draw(st.sampled_from(MODELS))
    items = [f"model.name={name}"]
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["model"] * 6 + sorted(SECTIONS)))
        cls = model_config_class(name) if section == "model" else SECTIONS[section]
        hints = typing.get_type_hints(cls)
        key = draw(st.sampled_from(sorted(k for k in hints if k != "name")))
        items.append(f"{section}.{key}={draw(typed_value(hints[key]))}")
    return items


@st.composite
def any_override(draw) -> str:
    kind = draw(st.integers(0, 9))
    if kind <= 5:
        return draw(known_override())
    if kind == 6:  # a made-up key in a real or made-up section
        return f"{draw(sections)}.{draw(st.text(max_size=8))}={draw(values)}"
    if kind == 7:
        return f"name={draw(values)}"
    # malformed words: no '=', empty key or value, too many dots, stray spaces
    return draw(
        st.one_of(
            st.text(max_size=20),
            st.sampled_from(["=", "=1", ".=1", "a.=1", ".b=1", "a.b.c=1", " train.steps = 3 "]),
            st.builds(lambda s, k: f"{s}.{k}=", sections, st.text(max_size=5)),
        )
    )


overrides = st.one_of(st.lists(any_override(), max_size=5), typed_overrides())


def assert_valid(cfg: RunConfig) -> None:
    """A resolved config holds values of the types and ranges the loader promises."""
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name in MODELS
    assert cfg.train.steps > 0 and cfg.train.batch_size > 0 and cfg.train.seq_len > 0
    assert cfg.train.seq_len <= cfg.model.max_seq_len
    assert math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0
    assert cfg.sample.max_new_tokens >= 0 and 0 < cfg.sample.top_p <= 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMED), items=overrides)
def test_load_config_resolves_or_names_the_problem(name, items):
    try:
        cfg = load_config(name, items)
    except NestlearnError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), message
        return
    assert_valid(cfg)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(NAMED), items=overrides)
def test_info_prints_the_config_or_one_line_error(name, items, capsys):
    argv = ["info", *([name] if name else []), *items]
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse: a usage error (an option-like word)
        status = exc.code
    captured = capsys.readouterr()
    assert status in (0, 2), captured.err
    if status == 2:
        assert captured.err.strip() and "Traceback" not in captured.err
    else:
        assert "total" in captured.out


# Tracebacks this property found once, kept as fixed examples: the word and the key the error
# must name.
FOUND = [
    (["model.name=titans_lmm", "model.init_std=-1.7"], "model.init_std=-1.7 must be >= 0"),
    (["model.name=deltanet", "model.mlp_hidden=-326"], "model.mlp_hidden=-326 must be >= 0"),
    (["model.d_model=98880101038860"], "model.d_model=98880101038860 is too large"),
    (["model.name=titans_mac", "model.memory_depth=9007199254740992"], "model.memory_depth="),
    (["model.name=titans_mal", "model.conv_size=99999999999999999999"], "out of range"),
    (["optim.lr=.nan"], "optim.lr: expected a finite number"),
    (["model.norm_eps=.inf"], "model.norm_eps: expected a finite number"),
    (["data.\n0=0"], "unknown key in [data] '\\n0'"),
    (["0\n.=0"], "unknown section '0\\n'"),
]


@pytest.mark.parametrize("words,fragment", FOUND)
def test_found_cases_are_one_line_errors(words, fragment, capsys):
    assert main(["info", *words]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "word",
    [
        "train.steps=1e999",
        "train.steps=.nan",
        "model.cms_chunk_sizes=[[1]]",
        "sample.prompt=abc\udcff",
        'sample.prompt="\\ud800"',
        "name=[1, 2]",
        "data.source={a: 1}",
    ],
)
def test_odd_values_resolve_or_name_the_problem(word):
    try:
        cfg = load_config(None, [word])
    except NestlearnError:
        return
    assert_valid(cfg)
