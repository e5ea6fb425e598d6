# SPDX-License-Identifier: LGPL-2.1-or-later
"""``make demo``: the whole product in one command.

Builds the test guest, starts vmspawnd on a private socket, creates and starts a VM through
vmspawnctl, follows the event stream up to READY, lists and describes the machine, stops it
(ACPI power-off) and shuts the daemon down.  Every step prints the command it runs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vmspawnd.testing.guest import build_guest

BIN = Path(sys.executable).parent


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    print("$ " + shlex.join(argv), flush=True)
    p = subprocess.run(list(argv), text=True, capture_output=True)
    print((p.stdout + p.stderr).rstrip(), flush=True)
    if p.returncode != 0:
        raise SystemExit(f"demo: command failed with exit status {p.returncode}")
    return p


def main() -> int:
    step("Building (or reusing) the test guest: Debian cloud kernel + busybox initramfs")
    guest = build_guest()
    print(f"kernel {guest.kernel}\ninitrd {guest.initrd}")

    with tempfile.TemporaryDirectory(prefix="vmspawnd-demo.") as tmp:
        base = Path(tmp)
        sock = base / "vmspawnd.sock"
        ctl = [str(BIN / "vmspawnctl"), f"--address={sock}"]
        step("Starting the daemon on a private socket")
        daemon_argv = [str(BIN / "vmspawnd"), f"--socket={sock}", f"--state-dir={base / 'state'}",
                       f"--runtime-dir={base / 'run'}"]
        print("$ " + shlex.join(daemon_argv) + " &")
        daemon = subprocess.Popen(daemon_argv, stderr=open(base / "daemon.log", "w"), stdin=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if sock.exists():
                    break
                time.sleep(0.1)
            else:
                raise SystemExit("demo: the daemon did not come up:\n" + (base / "daemon.log").read_text())

            step("Defining a VM (same options as vmspawn)")
            run(*ctl, "create", "demo", f"--linux={guest.kernel}", f"--initrd={guest.initrd}", "--ram=256M",
                "--console=read-only", "test.notify=1", "test.action=acpi", "test.exit=0",
                "test.status=hello_from_the_demo_guest")

            step("Starting it and following its events until the guest reports READY=1")
            events_argv = [*ctl, "events", "demo"]
            print("$ " + shlex.join(events_argv) + " &")
            events = subprocess.Popen(events_argv, stdout=subprocess.PIPE, text=True)
            ready = threading.Event()

            def follow() -> None:
                assert events.stdout is not None
                for line in events.stdout:
                    print("  event: " + line.rstrip(), flush=True)
                    if " ready" in line:
                        ready.set()

            threading.Thread(target=follow, daemon=True).start()
            time.sleep(0.3)
            run(*ctl, "start", "demo")
            if not ready.wait(120):
                raise SystemExit("demo: the guest never became ready")
            time.sleep(0.3)

            step("What the daemon knows")
            run(*ctl, "list")
            run(*ctl, "status", "demo")
            if Path("/run/systemd/system").is_dir() and shutil.which("machinectl"):
                step("What systemd-machined knows (the daemon registered the VM)")
                run("machinectl", "list")

            step("Stopping it: ACPI power button, the guest powers off by itself")
            run(*ctl, "stop", "demo")
            time.sleep(0.3)
            events.send_signal(signal.SIGTERM)
            events.wait(5)
            run(*ctl, "remove", "demo")
        finally:
            step("Shutting the daemon down")
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
            print(f"vmspawnd exited with status {daemon.returncode}")
    print("\nDemo complete: a real QEMU VM was created, booted, reported ready and powered off through vmspawnd.")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
