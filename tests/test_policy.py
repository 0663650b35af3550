import pytest

from cloudlab import policy
from cloudlab.errors import CapacityError, ConfigError, RemoteError, format_ids


@pytest.mark.parametrize("n_items,n_engines,expected", [
    (100_000, 16, 1563), (10, 4, 1), (0, 4, 1), (17, 1, 5), (1, 16, 1)])
def test_chunksize_gives_about_four_chunks_per_engine(n_items, n_engines, expected):
    assert policy.choose_chunksize(n_items, n_engines) == expected


def test_split_and_partition_cover_items_in_order():
    items = list(range(10))
    assert policy.split(items, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    parts = policy.partition(items, 3)
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert policy.partition([1], 3) == [[1], [], []]


@pytest.mark.parametrize("value,message", [
    (-3, "at least 1"), (0, "at least 1"), ("lots", "whole number like 4"),
    (2.5, "whole number"), (True, "whole number")])
def test_engine_count_refuses_bad_numbers_with_one_sentence(value, message):
    with pytest.raises(ConfigError, match=message):
        policy.engine_count(value, 100, "reason")


def test_engine_count_refuses_more_than_capacity_and_suggests_a_number():
    with pytest.raises(CapacityError) as e:
        policy.engine_count(100_000, 150, "each engine needs about 120 MB")
    assert e.value.limit == 150
    assert "ask for at most 150" in str(e.value)
    assert policy.engine_count("16", 150, "") == 16


def test_format_ids_compresses_ranges():
    assert format_ids([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_ids([]) == ""


def test_remote_error_collapses_identical_failures():
    tb = "Traceback...\nZeroDivisionError: division by zero"
    err = RemoteError({i: ("ZeroDivisionError", "division by zero", tb) for i in range(16)})
    text = str(err)
    assert text.startswith("ZeroDivisionError: division by zero on 16 engines [0-15]")
    assert text.count("Traceback") == 1
    mixed = RemoteError({0: ("KeyError", "'a'", ""), 1: ("ValueError", "bad", ""),
                         2: ("ValueError", "bad", "")})
    assert "KeyError: 'a' on 1 engine [0]" in str(mixed)
    assert "ValueError: bad on 2 engines [1-2]" in str(mixed)


def test_the_local_default_is_one_engine_per_usable_core():
    import cloudlab
    from cloudlab.policy import usable_cores

    assert cloudlab.Cluster().n == usable_cores()  # (not started: nothing runs)
    assert cloudlab.Cluster(engines=3).n == 3  # a profile's own count still wins
