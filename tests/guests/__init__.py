"""Tests against real QEMU and libvirt guests (built on first use by helpers/guest)."""
