import pytest

from cloudlab.errors import ConfigError, UnknownNameError
from cloudlab.profiles import ClusterOptions, available_profiles, cloudlab_home, load_profile


@pytest.fixture
def user_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOUDLAB_HOME", str(tmp_path))
    (tmp_path / "profiles").mkdir()
    return tmp_path / "profiles"


def test_local_profile_is_the_default():
    profile = load_profile()
    assert profile.name == "local"
    assert profile.cluster.engine == "ipyparallel"
    assert profile.cluster.backend == "local"
    assert profile.backend_options.ip == "127.0.0.1"


def test_keywords_override_profile_values():
    profile = load_profile("local", engine="dask", engines=7, ip="127.0.0.2")
    assert (profile.cluster.engine, profile.cluster.engines) == ("dask", 7)
    assert profile.backend_options.ip == "127.0.0.2"


def test_user_profile_shadows_repository_profile(user_profiles):
    (user_profiles / "local.toml").write_text('engine = "dask"\nengines = 2\n')
    (user_profiles / "mine.toml").write_text('engines = 3\n[local]\nmemory_fraction = 0.5\n')
    assert load_profile("local").cluster.engine == "dask"
    mine = load_profile("mine")
    assert mine.cluster.engines == 3 and mine.backend_options.memory_fraction == 0.5
    assert set(available_profiles()) >= {"local", "mine"}


def test_unknown_profile_lists_the_valid_names():
    with pytest.raises(UnknownNameError, match=r"Unknown profile 'nope': use one of .*local"):
        load_profile("nope")


@pytest.mark.parametrize("kind,kwargs", [("engine", {"engine": "spark"}),
                                         ("backend", {"backend": "mainframe"})])
def test_unknown_engine_or_backend_lists_installed_ones(kind, kwargs):
    with pytest.raises(ConfigError) as e:
        load_profile(**kwargs)
    assert f"Unknown {kind}" in str(e.value)
    assert ("dask, inprocess, ipyparallel" if kind == "engine" else "local") in str(e.value)


def test_malformed_toml_names_the_file(user_profiles):
    path = user_profiles / "broken.toml"
    path.write_text("engine = \n")
    with pytest.raises(ConfigError, match=f"{path} is not valid TOML"):
        load_profile("broken")


@pytest.mark.parametrize("body,message", [
    ('engnie = "dask"', "unknown key 'engnie'; allowed top-level keys: backend, description, engine"),
    ('engines = "lots"', "key 'engines' must be a whole number, got 'lots'"),
    ('engine = "spark"', "Unknown engine 'spark': use one of dask, inprocess, ipyparallel"),
    ('[local]\nport = 3', "unknown key 'port'; allowed: fork_server, ip, memory_fraction, python"),
    ('start_timeout = true', "key 'start_timeout' must be a number, got True"),
])
def test_validation_error_names_file_key_and_allowed_values(user_profiles, body, message):
    (user_profiles / "bad.toml").write_text(body + "\n")
    with pytest.raises(ConfigError) as e:
        load_profile("bad")
    assert message in str(e.value)
    if "Unknown engine" not in message:
        assert str(user_profiles / "bad.toml") in str(e.value)


def test_unknown_keyword_option_is_refused():
    with pytest.raises(ConfigError, match="Unknown option 'colour'"):
        load_profile(colour="red")


def test_every_option_is_documented():
    import dataclasses

    for f in dataclasses.fields(ClusterOptions):
        assert f.metadata["help"], f.name
    assert cloudlab_home().name  # CLOUDLAB_HOME is honoured (set by conftest)
