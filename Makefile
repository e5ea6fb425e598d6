# SPDX-License-Identifier: LGPL-2.1-or-later
# vmspawnd — make setup | test | demo | lint | install
# `make demo` and `make test` set everything up first (as root on Debian: apt packages too).

# The distribution's Python where there is one (/usr/bin/python3: Debian's, whose python3-venv and
# python3-dev are among the packages below), not whichever python3 comes first on $PATH: a system
# service's interpreter must not live in someone's home (pyenv's goes when its owner removes it), and
# Debian's, built statically, starts ≈ 1.3x sooner than pyenv's shared build (bench/notes.md, session 39).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := qemu-system-x86 qemu-utils ovmf swtpm swtpm-tools busybox-static cpio \
	libsystemd-dev pkg-config gcc libc6-dev python3-dev python3-venv tmux openssh-client libwrap0 groff-base \
	systemd-journal-remote systemd-container vhost-device-vsock
# vhost-device-vsock (a vsock device for hosts without /dev/vhost-vsock) is new in Debian forky: on an
# older release apt gets it, and nothing else, from forky (these two files pin it so).
FORKY_SOURCE := /etc/apt/sources.list.d/vmspawnd-forky.sources
FORKY_PIN := /etc/apt/preferences.d/vmspawnd-forky.pref
STAMP := $(VENV)/.installed

.PHONY: bench setup test test-fast test-fuzz demo lint varlink install guest clean FORCE

setup: $(STAMP)
	@$(MAKE) --no-print-directory deb-packages

deb-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		if ! dpkg-query -W -f='$${Status}' vhost-device-vsock 2>/dev/null | grep -q 'ok installed' \
			&& [ -z "$$(apt-cache policy vhost-device-vsock 2>/dev/null | awk '/Candidate:/ && $$2 != "(none)" {print $$2}')" ] \
			&& [ ! -e $(FORKY_SOURCE) ]; then \
			echo "vhost-device-vsock: from Debian forky (pinned to that one package)"; \
			printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: forky' 'Components: main' \
				'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' > $(FORKY_SOURCE); \
			printf '%s\n' 'Package: *' 'Pin: release n=forky' 'Pin-Priority: -1' '' \
				'Package: vhost-device-vsock' 'Pin: release n=forky' 'Pin-Priority: 500' > $(FORKY_PIN); \
			apt-get -q -o DPkg::Lock::Timeout=600 update -qq; fi; \
		missing=""; for p in $(DEB_PACKAGES); do \
			dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ] || [ -z "$$(apt-cache policy linux-image-cloud-amd64 2>/dev/null | awk '/Candidate:/ && $$2 != "(none)" {print $$2}')" ]; then \
			echo "apt-get update"; apt-get -q -o DPkg::Lock::Timeout=600 update -qq; fi; \
		if [ -n "$$missing" ]; then echo "installing:$$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $$missing >/dev/null; fi; \
	else echo "not root: skipping Debian packages ($(DEB_PACKAGES))"; fi

$(STAMP): pyproject.toml $(VENV)/pyvenv.cfg
	@$(MAKE) --no-print-directory deb-packages
	@$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -m pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/python -c 'import vmspawnd, asyncvarlink, structlog, sdnotify, systemd, dbus_fast, qemu.qmp, pytest'
	@$(BIN)/python -m vmspawnd.precompile
	@touch $@

# The venv, made (after the Debian packages: python3-venv) when missing, and made again when $(PYTHON) is
# another interpreter than the one its pyvenv.cfg names; untouched otherwise, so $(STAMP) stays made.
$(VENV)/pyvenv.cfg: FORCE
	@have="$$(sed -n 's/^executable = //p' $@ 2>/dev/null)"; \
	if [ -n "$$have" ]; then \
		want="$$($(PYTHON) -c 'import os, sys; print(os.path.realpath(sys.executable))')" \
			|| { echo "PYTHON=$(PYTHON) cannot be run: $(VENV) kept" >&2; exit 1; }; \
		if [ "$$have" != "$$want" ]; then echo "$(VENV) was made with $$have: made again with $$want"; rm -rf $(VENV); fi; \
	fi; \
	if [ ! -e $@ ]; then $(MAKE) --no-print-directory deb-packages && $(PYTHON) -m venv $(VENV); fi

guest: setup
	$(BIN)/python -m vmspawnd.testing.guest

# the host tier (unit + real VMs), then the systemd tier inside its container
test: setup
	$(BIN)/pytest -m "not systemd and not peer" --ignore=tests/systemd/test_harness.py
	$(MAKE) --no-print-directory test-systemd
	$(MAKE) --no-print-directory test-peer

test-fast: setup
	$(BIN)/pytest -m "not vm and not systemd and not peer and not fuzz and not install" --ignore=tests/systemd/test_harness.py

# speed figures against their targets (never part of `make test`): bench/results.md, bench/latency.json
bench: setup
	$(BIN)/python -m bench.latency --json bench/latency.json --markdown bench/results.md

# the fuzz tier alone: hostile and heavy load against a real daemon (also part of `make test`)
test-fuzz: setup
	$(BIN)/pytest -m fuzz tests/fuzz

demo: setup
	$(BIN)/python -m vmspawnd.testing.demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# the varlink interface file, written from what the daemon serves (a test keeps them equal)
varlink: setup
	$(BIN)/python -c 'import vmspawnd.interface as i; print(i.interface_description(), end="")' \
		> varlink/io.vmspawnd.Manager.varlink.new
	mv varlink/io.vmspawnd.Manager.varlink.new varlink/io.vmspawnd.Manager.varlink

clean:
	rm -rf $(VENV) build *.egg-info

PREFIX ?= /usr/local
UNITDIR ?= /etc/systemd/system
LIBDIR ?= $(PREFIX)/lib/vmspawnd
DOCDIR ?= $(PREFIX)/share/doc/vmspawnd
VARLINKDIR ?= $(PREFIX)/share/varlink
MANDIR ?= $(PREFIX)/share/man
POLKITDIR ?= /usr/share/polkit-1/actions
COMMANDS := vmspawn vmspawnctl vmspawnd

# A self-contained copy: its own venv under $(LIBDIR) with the project (not editable) and its
# dependencies, the three commands linked into $(PREFIX)/bin, the units pointing there.  Running
# it again upgrades in place.  (The QEMU, swtpm, virtiofsd… packages are `make setup`'s job.)
.PHONY: uninstall
install:
	test -x $(DESTDIR)$(LIBDIR)/bin/python || $(PYTHON) -m venv $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING' || true
	$(DESTDIR)$(LIBDIR)/bin/python -m pip install -q --upgrade --force-reinstall --no-deps . 2>&1 | grep -v '^WARNING' || true
	$(DESTDIR)$(LIBDIR)/bin/python -m pip install -q . 2>&1 | grep -v '^WARNING' || true
	@# (from /: in the checkout, python -c would import the checkout's package, not the copy just installed)
	cd / && $(DESTDIR)$(LIBDIR)/bin/python -c 'import vmspawnd.cli.vmspawnd, vmspawnd.cli.vmspawnctl, vmspawnd.cli.vmspawn, vmspawnd.cli.foreground'
	@# the caches of every command's start: its modules' bytecode in one file (vmspawnd/modulecache.py), dataclasses'
	@# generated methods and the patterns modules compile at import (vmspawnd/methodcache.py), made once
	cd / && $(DESTDIR)$(LIBDIR)/bin/python -m vmspawnd.precompile
	@# (with DESTDIR: the scripts pip wrote start with the staging path; they run from $(LIBDIR))
	@if [ -n "$(DESTDIR)" ]; then for f in $(DESTDIR)$(LIBDIR)/bin/*; do if [ -f "$$f" ] && [ ! -L "$$f" ]; then \
		sed -i '1s|^#!$(DESTDIR)$(LIBDIR)/bin/|#!$(LIBDIR)/bin/|' "$$f"; fi; done; fi
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(VARLINKDIR) $(DESTDIR)$(DOCDIR)
	for c in $(COMMANDS); do ln -sfn $(LIBDIR)/bin/$$c $(DESTDIR)$(PREFIX)/bin/$$c; done
	$(DESTDIR)$(LIBDIR)/bin/python -m vmspawnd.systemd.unitfile units/vmspawnd.service \
		--bindir=$(PREFIX)/bin --docdir=$(DOCDIR) > $(DESTDIR)$(UNITDIR)/vmspawnd.service
	$(DESTDIR)$(LIBDIR)/bin/python -m vmspawnd.systemd.unitfile units/vmspawnd.socket \
		--bindir=$(PREFIX)/bin --docdir=$(DOCDIR) > $(DESTDIR)$(UNITDIR)/vmspawnd.socket
	install -m 0644 varlink/io.vmspawnd.Manager.varlink $(DESTDIR)$(VARLINKDIR)/
	install -D -m 0644 polkit/io.vmspawnd.policy $(DESTDIR)$(POLKITDIR)/io.vmspawnd.policy
	install -m 0644 README.md LICENSE docs/*.md $(DESTDIR)$(DOCDIR)/
	install -d $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8
	$(DESTDIR)$(LIBDIR)/bin/python -m vmspawnd.manpage $(DESTDIR)$(MANDIR)/man1
	mv $(DESTDIR)$(MANDIR)/man1/vmspawnd.8 $(DESTDIR)$(MANDIR)/man8/
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; \
		echo "installed; enable with: systemctl enable --now vmspawnd.socket"; fi

# Removes what `make install` put there; machine definitions (/var/lib/vmspawnd) are kept.
uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl disable --now vmspawnd.socket vmspawnd.service 2>/dev/null || true; fi
	rm -f $(DESTDIR)$(UNITDIR)/vmspawnd.service $(DESTDIR)$(UNITDIR)/vmspawnd.socket
	for c in $(COMMANDS); do rm -f $(DESTDIR)$(PREFIX)/bin/$$c; done
	rm -f $(DESTDIR)$(VARLINKDIR)/io.vmspawnd.Manager.varlink $(DESTDIR)$(POLKITDIR)/io.vmspawnd.policy
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DOCDIR)
	rm -f $(DESTDIR)$(MANDIR)/man1/vmspawn.1 $(DESTDIR)$(MANDIR)/man1/vmspawnctl.1 $(DESTDIR)$(MANDIR)/man8/vmspawnd.8
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# The systemd tier: a real systemd + machined in a container booted with the host's systemd-nspawn
# (root; cached under ${VMSPAWND_CACHE:-~/.cache/vmspawnd}/systemd-tree): Debian bookworm (systemd 252,
# Debian 12's: machined over D-Bus), Debian trixie (systemd 257), then Debian forky (systemd 262:
# machinectl through each VM's control socket).  Runs
# `pytest -m systemd tests/systemd` inside each, then the harness's own boot/teardown/leak tests.
.PHONY: test-systemd
test-systemd: setup
	$(BIN)/python -m tests.systemd.container --if-root --suite=bookworm test
	$(BIN)/python -m tests.systemd.container --if-root test
	$(BIN)/python -m tests.systemd.container --if-root --suite=forky test
	@if [ "$$(id -u)" = 0 ]; then VMSPAWND_SYSTEMD_HARNESS=1 $(BIN)/pytest -q tests/systemd/test_harness.py; fi

# The peer tier: `vmspawn --firmware=list|describe` side by side with systemd-vmspawn 262 from a
# minimal Debian forky tree (root; built once with mmdebstrap, cached under
# ${VMSPAWND_CACHE:-~/.cache/vmspawnd}/peer-tree). See tests/peer/peer.py.
.PHONY: test-peer
test-peer: setup
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/pytest -q -m peer tests/peer; \
	else echo "SKIPPED test-peer: needs root (mmdebstrap, mount namespace, chroot)"; fi
