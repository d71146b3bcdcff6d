"""Recordings of real guest boots (the inputs layer): ``desim record`` and the recording format.

* :mod:`desim.record.format` — the recording file (npz + TOML header) and its checks; the only
  module the simulator needs (:mod:`desim.replay` reads recordings through it).
* :mod:`desim.record.cli` — ``desim record``: boots a Linux guest under QEMU TCG with the plugin
  and converts what QEMU reports; :mod:`desim.record.qemu` runs QEMU,
  :mod:`desim.record.convert` translates pages and classifies BAR changes,
  :mod:`desim.record.build` compiles ``plugin.c`` (the QEMU TCG plugin, C) on demand,
  :mod:`desim.record.initramfs` writes the busybox initramfs.

Only the standard library and numpy; QEMU, gcc, glib headers and busybox are needed by
``desim record`` itself, never by the simulator or the tests that use committed recordings.
"""
