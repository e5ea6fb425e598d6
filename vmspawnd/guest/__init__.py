# SPDX-License-Identifier: LGPL-2.1-or-later
"""The guest side: notify channel and credentials."""
