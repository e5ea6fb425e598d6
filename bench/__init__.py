# SPDX-License-Identifier: LGPL-2.1-or-later
"""Benchmarks (make bench); not part of make test."""
