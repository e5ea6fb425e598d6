# SPDX-License-Identifier: LGPL-2.1-or-later
"""vmspawnd: run virtual machines the systemd way, from the command line or as a service."""

__version__ = "0.1.0"
