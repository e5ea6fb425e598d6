# SPDX-License-Identifier: LGPL-2.1-or-later
"""Auxiliary services of a VM: swtpm and virtiofsd, run as transient units or as our children."""
