"""Everything about talking to QEMU: binary and accelerator, argv, QMP."""
