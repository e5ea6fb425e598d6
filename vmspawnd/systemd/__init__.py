# SPDX-License-Identifier: LGPL-2.1-or-later
"""Talking to systemd: sd_notify to our manager (later machined, units, scopes)."""
