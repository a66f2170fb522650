"""REDIS_URL names the topology: one server, Sentinel or Cluster (service.topology), and the
hash tags that spread the partitions over a cluster's slots (service.keys)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.keys import KeySchema, partition_tag, slot_range
from service.leaderboard import combined
from service.settings import ConfigError, Settings
from service.streamids import order
from service.topology import BadRedisUrl, parse


def test_one_server_urls_are_redis_pys_own() -> None:
    for url in ("redis://h:6379/0", "rediss://:pw@h:6380/2", "unix:///run/redis.sock?db=1"):
        target = parse(url)
        assert (target.kind, target.url) == ("server", url)
    assert parse("rediss://h:1/0").tls and not parse("redis://h:1/0").tls


def test_a_sentinel_url_names_the_sentinels_the_primary_and_the_database() -> None:
    target = parse("redis+sentinel://:secret@s1:26379,s2:26380,[::1]:26381/score/3")
    assert target.kind == "sentinel" and not target.tls
    assert target.hosts == (("s1", 26379), ("s2", 26380), ("::1", 26381))
    assert target.master == "score"
    assert target.options["password"] == "secret" and target.options["db"] == 3
    assert target.sentinel_options == {}  # the URL's credentials are the data nodes'
    with_auth = parse("rediss+sentinel://s1:1/m?sentinel_password=p2&ssl_cert_reqs=none")
    assert with_auth.tls and with_auth.sentinel_options == {"password": "p2"}
    assert with_auth.options["ssl_cert_reqs"] == "none" and with_auth.options["db"] == 0


def test_a_cluster_url_names_its_seed_nodes() -> None:
    target = parse("redis+cluster://user:pw@n1:7000,n2:7001")
    assert (target.kind, target.hosts) == ("cluster", (("n1", 7000), ("n2", 7001)))
    assert target.options["username"] == "user" and "db" not in target.options
    assert parse("rediss+cluster://n1:7000").tls


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h:1", "scheme"),
        ("h:6379", "scheme"),
        ("redis+sentinel://s1:26379", "master-name"),
        ("redis+sentinel://s1:26379/m/x", "database must be a number"),
        ("redis+sentinel://s1:26379/m/1/2", "master-name"),
        ("redis+sentinel:///m", "at least one host"),
        ("redis+sentinel://s1/m", "host:port"),
        ("redis+cluster://n1:70000", "host:port"),
        ("redis+cluster://n1:7000/0", "takes no path"),
        ("redis+cluster://n1:x", "host:port"),
    ],
)
def test_a_malformed_url_is_refused_with_one_line_that_says_why(url: str, says: str) -> None:
    with pytest.raises(BadRedisUrl, match=says) as raised:
        parse(url)
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match=says):  # the commands exit 2 with it
        Settings.from_env({"REDIS_URL": url, "SCORE_JWT_SECRET": "s" * 40})


def test_one_partition_keeps_the_tag_of_every_earlier_version() -> None:
    assert KeySchema(1).all()[0].tag == "{p0}"
    assert KeySchema(3, scheme=1).all()[2].tag == "{p2}"


@given(st.integers(1, 256).flatmap(lambda p: st.tuples(st.just(p), st.integers(0, p - 1))))
def test_partition_i_of_p_lies_in_the_ith_of_p_equal_slot_ranges(case: tuple[int, int]) -> None:
    partitions, index = case
    keys = KeySchema(partitions).partition(index)
    low, high = slot_range(index, partitions)
    assert low <= keys.slot < high
    assert keys.tag == "{" + partition_tag(index, partitions) + "}"


def test_three_partitions_land_on_three_primaries_of_a_three_primary_cluster() -> None:
    primaries = [slot_range(i, 3) for i in range(3)]
    owners = {
        next(n for n, (lo, hi) in enumerate(primaries) if lo <= k.slot < hi)
        for k in KeySchema(3).all()
    }
    assert owners == {0, 1, 2}
    # the scheme before put {p0} (15882) and {p1} (11819) on one primary, {p2} (7752) on another
    legacy = [k.slot for k in KeySchema(3, scheme=1).all()]
    assert legacy == [15882, 11819, 7752]


def test_the_version_grows_with_a_change_of_any_partition_whatever_their_clocks() -> None:
    # partition 0's primary runs 5 ms ahead: a change of partition 1 must still be newer (the
    # newest id alone, the version before, stayed 105-0 and an SSE resume skipped it)
    before = combined(["105-0", "100-0"])
    after = combined(["105-0", "101-0"])
    assert order(after) > order(before)
    assert order(combined(["105-0", "101-1"])) > order(after)  # same ms, next seq
    assert combined(["1795789034340-7"]) == "1795789034340-7"  # one partition: its own id


@given(st.lists(st.tuples(st.integers(0, 2**41), st.integers(0, 1000)), min_size=1, max_size=8))
def test_any_newer_id_of_any_partition_makes_a_newer_version(ids: list[tuple[int, int]]) -> None:
    versions = [f"{ms}-{seq}" for ms, seq in ids]
    for i, (ms, seq) in enumerate(ids):
        for newer in (f"{ms}-{seq + 1}", f"{ms + 1}-0"):
            changed = [*versions[:i], newer, *versions[i + 1 :]]
            assert order(combined(changed)) > order(combined(versions))
