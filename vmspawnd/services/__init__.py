"""Auxiliary services of a VM: swtpm and virtiofsd, run as transient units or as our children."""
