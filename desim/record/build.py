"""Build the recording plugin (``plugin.c``) against the installed QEMU's plugin header, on demand.

QEMU's TCG plugins are shared objects loaded with ``-plugin``; they must be
compiled against the ``qemu-plugin.h`` of the QEMU that loads them (the
plugin API version is checked at load time). Debian ships no package with
that header; it is in QEMU's source (``include/qemu/qemu-plugin.h``)::

    # a deb-src entry for bookworm (QEMU 7.2), signed by the Debian archive keyring
    printf 'Types: deb-src\\nURIs: http://deb.debian.org/debian\\nSuites: bookworm bookworm-updates\\n'\\
'Components: main\\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\\n' \\
        > /etc/apt/sources.list.d/debian-src-bookworm.sources
    apt-get update && apt-get install -y gcc libglib2.0-dev pkg-config
    cd /tmp && apt-get source --download-only qemu
    tar xf qemu_7.2+dfsg.orig.tar.xz qemu-7.2.0/include/qemu/qemu-plugin.h

then ``desim record --plugin-header /tmp/qemu-7.2.0/include/qemu/qemu-plugin.h``
(or ``DESIM_QEMU_PLUGIN_H``). The built plugin is cached under
``$XDG_CACHE_HOME/desim`` (default ``~/.cache/desim``), keyed by a hash of
the source and the header.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import DesimInputError

HEADER_PLACES = ("/usr/include/qemu-plugin.h", "/usr/include/qemu/qemu-plugin.h",
                 "/usr/local/include/qemu-plugin.h", "/usr/local/include/qemu/qemu-plugin.h")


def find_header(given: str | None) -> Path:
    cands = [given] if given else [os.environ.get("DESIM_QEMU_PLUGIN_H")] + list(HEADER_PLACES)
    for c in cands:
        if c and Path(c).is_file():
            text = Path(c).read_text(errors="replace")
            if "qemu_plugin_register_vcpu_mem_cb" not in text:
                raise DesimInputError(f"--plugin-header {c}: not QEMU's qemu-plugin.h")
            return Path(c)
    if given:
        raise DesimInputError(f"--plugin-header {given}: file not found")
    raise DesimInputError("qemu-plugin.h not found: extract include/qemu/qemu-plugin.h from QEMU's source "
                          "(apt-get source qemu; see desim/record/build.py) and pass --plugin-header PATH")


def plugin_api_version(header: Path) -> int:
    m = re.search(r"#define\s+QEMU_PLUGIN_VERSION\s+(\d+)", header.read_text(errors="replace"))
    return int(m.group(1)) if m else 0


def build_plugin(header: Path) -> Path:
    """The compiled plugin for ``header`` (built now if not cached)."""
    src = resources.files("desim.record").joinpath("plugin.c").read_bytes()
    key = hashlib.sha256(src + header.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "desim"
    out = cache / f"desim_record_plugin-{key}.so"
    if out.is_file():
        return out
    gcc = shutil.which("gcc")
    pkg = shutil.which("pkg-config")
    if gcc is None or pkg is None:
        raise DesimInputError("building the recording plugin needs gcc and pkg-config "
                              "(apt-get install gcc pkg-config libglib2.0-dev)")
    p = subprocess.run([pkg, "--cflags", "glib-2.0"], capture_output=True, text=True)
    if p.returncode != 0:
        raise DesimInputError("glib headers not found (apt-get install libglib2.0-dev)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        c = Path(d) / "plugin.c"
        c.write_bytes(src)
        tmp = Path(d) / "plugin.so"
        cmd = [gcc, "-O2", "-fPIC", "-shared", "-Wall", *p.stdout.split(), f"-I{header.parent}", "-o", str(tmp), str(c)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            first = (r.stderr.strip().splitlines() or ["no message"])[0]
            raise DesimInputError(f"building the recording plugin failed: {first}")
        fd, staged = tempfile.mkstemp(dir=cache, prefix=".plugin-", suffix=".so")
        os.close(fd)
        shutil.copyfile(tmp, staged)
        os.chmod(staged, 0o755)
        os.replace(staged, out)
    return out
