"""Talking to systemd: sd_notify to our manager (later machined, units, scopes)."""
