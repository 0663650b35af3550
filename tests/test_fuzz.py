"""Bad input, generated: magic lines and profile files either work or fail in one sentence.

Hypothesis builds %cluster lines from the magic's own words mixed with junk,
and profile files from its keys mixed with junk keys and values of every TOML
type. Every input must either work or raise a cloudlab error (a UsageError in
the magic) whose message is one line, never a traceback, and nothing may be
left running. Engine counts in the lines are kept small or absurd, so what
works starts at most two engines.
"""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

import cloudlab
from cloudlab.profiles import ClusterOptions, cloudlab_home
from conftest import our_processes

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

words = st.sampled_from(["start", "status", "scale", "stop", "list", "cancel", "--all", "",
                         "--engine", "--profile", "--backend", "--name", "-n", "--", "?"])
names = st.sampled_from(["ipyparallel", "dask", "local", "ssh", "nope", "ipp", "ÿ", "a b"])
numbers = st.sampled_from(["1", "2", "0", "-1", "2.5", "two", "1e9", "99999999999", "0x2"])
junk = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
lines = st.lists(st.one_of(words, names, numbers, junk), max_size=6).map(" ".join)


@pytest.fixture
def fuzz_profile():
    """The path of a user profile named "fuzz", removed afterwards."""
    folder = cloudlab_home() / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fuzz.toml"
    yield path
    path.unlink(missing_ok=True)


def one_sentence(message: str) -> None:
    assert message.strip(), "an empty error"
    assert "\n" not in message.strip(), f"more than one line: {message!r}"
    assert "Traceback" not in message


@FUZZ
@given(line=lines)
def test_any_cluster_magic_line_works_or_says_what_to_fix(ip, line):
    try:
        ip.run_line_magic("cluster", line)
    except (UsageError, cloudlab.CloudlabError) as error:
        if not isinstance(error, cloudlab.RemoteError):
            one_sentence(str(error))
    finally:
        for c in cloudlab.running_clusters():
            c.stop()
    assert our_processes(servers=False) == []


toml_values = st.recursive(
    st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
              st.text(max_size=10), st.sampled_from(["ipyparallel", "dask", "local", "2GB",
                                                     "auto", "none", "ssh", "127.0.0.1"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=5)
keys = st.one_of(st.sampled_from([f.name for f in ClusterOptions.__dataclass_fields__.values()]
                                 + ["local", "engnes", "ip", "fork_server"]),
                 st.text(min_size=1, max_size=8))
profiles = st.dictionaries(keys, toml_values, max_size=5)


def as_toml(data: dict) -> str:
    """TOML text for ``data``, by hand: the standard library only reads TOML."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return {float("inf"): "inf", float("-inf"): "-inf"}.get(v, "nan" if v != v else repr(v))
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return '"' + v.encode("unicode_escape").decode().replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{" + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + "}"

    def key(k):
        return '"' + k.encode("unicode_escape").decode().replace('"', '\\"') + '"'

    return "\n".join(f"{key(k)} = {value(v)}" for k, v in data.items()) + "\n"


@FUZZ
@given(data=profiles)
def test_any_profile_file_works_or_says_what_to_fix(fuzz_profile, data):
    text = as_toml(data)
    fuzz_profile.write_text(text)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        pass  # still a file a user could write: cloudlab must say so in one sentence
    try:
        c = cloudlab.Cluster(profile="fuzz")
    except cloudlab.CloudlabError as error:
        one_sentence(str(error))
        assert "fuzz.toml" in str(error) or "engine" in str(error) or "profile" in str(error)
    else:
        assert c.state == "new" and c.n >= 1  # valid: built, nothing started
    assert our_processes(servers=False) == []


@FUZZ
@given(text=st.text(max_size=40))
def test_any_text_as_a_profile_file_works_or_says_what_to_fix(fuzz_profile, text):
    fuzz_profile.write_text(text)
    try:
        cloudlab.Cluster(profile="fuzz")
    except cloudlab.CloudlabError as error:
        one_sentence(str(error))
