# SPDX-License-Identifier: LGPL-2.1-or-later
"""Thin front ends: parse, call, print."""
