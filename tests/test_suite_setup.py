"""The test suite's own set-up (tests/conftest.py), checked where it can silently stop working."""


def test_under_loadgroup_each_test_carries_its_file_s_group(request):
    """conftest puts each test file (and files that share a session fixture) on one pytest-xdist
    worker; xdist reads the group from a suffix of the test id. When an upgrade breaks that
    (pytest 9.2 with xdist 3.8: pytest-xdist#1386) every test still passes, but both workers load
    every file's fixtures and CI takes a quarter longer: this test fails instead."""
    if not getattr(request.config.option, "loadgroup", False):
        return  # not under `-n N --dist loadgroup`: nothing is grouped
    assert request.node.nodeid.endswith("@test_suite_setup"), request.node.nodeid
