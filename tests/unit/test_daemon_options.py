# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd's own options: a bad value is a usage error naming the option and the value."""

from __future__ import annotations

import pytest

from vmspawnd.cli.vmspawnd import parse_args


@pytest.mark.parametrize("option,said", [
    ("--max-connections=0", "argument --max-connections: expected a number of at least 1, got '0'"),
    ("--max-connections=-5", "argument --max-connections: expected a number of at least 1, got '-5'"),
    ("--max-connections=²", "argument --max-connections: expected a number of at least 1, got '²'"),
    ("--socket-group=no-such-group", "argument --socket-group: no group named 'no-such-group' on this host"),
])
def test_a_bad_option_value_is_a_usage_error_naming_it(option, said, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args([option])
    assert exited.value.code == 2 and said in capsys.readouterr().err


def test_good_values_are_taken():
    args = parse_args(["--max-connections=7", "--socket-group=root"])
    assert (args.max_connections, args.socket_group) == (7, "root")
